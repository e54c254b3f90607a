"""Training configuration: one dataclass, commented defaults, and the published VOC/COCO recipes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..model import published


@dataclass
class TrainConfig:
    # data
    data: str = "synthetic"  # synthetic | voc | coco
    data_root: Optional[str] = None  # folder in the VOC layout (synthetic: the cache folder)
    train_split: str = "train"  # VOC: train_aug
    val_split: str = "val"
    split_list: Optional[str] = None  # a file overriding the train split list
    num_classes: int = 6  # K (20 VOC, 80 COCO; synthetic: its class count)
    crop_size: int = 96  # training crop and evaluation size (VOC: 448)
    workers: int = 2  # DataLoader workers
    # model
    backbone: str = "vit_tiny_patch16_224"  # a timm ViT of the tested families (README, Backbones; VOC: vit_base_patch16_224)
    pretrained: Optional[str] = None  # a local timm .pth/.safetensors file, or timm:<tag> (fetched by timm)
    num_registers: int = published.NUM_REGISTERS  # R
    topk_ratio: float = published.TOPK_RATIO  # GCR k = int(topk_ratio K)
    gcr_score: str = published.GCR_SCORE  # published | dot
    gcr: bool = True  # False: class tokens reach the losses and the LAM without GCR (the paper's baseline)
    depth: Optional[int] = 4  # blocks of the ViT; None: the named model's (12 for ViT-B/16)
    decoder_dim: int = 128  # LargeFOV width (published: 512)
    patch_size: Optional[int] = 8  # ViT patch size; None: the named model's (16)
    attn_impl: str = published.ATTN_IMPL  # sdpa (fused attention) | explicit (the published way, for baselines)
    # schedule
    iters: int = 800  # iterations to run (VOC: 20,000)
    schedule_iters: Optional[int] = None  # length of the LR schedule and loss phases; None: max(iters, recipe_iters)
    recipe_iters: int = 800  # the recipe's own length (synthetic 800, VOC 20,000, COCO 80,000)
    batch_size: int = 8  # VOC: 4
    backbone_lr: float = 5e-4  # backbone weights and norms (VOC: 6e-5 from pretrained; here from scratch)
    head_lr: float = 2e-3  # classifiers, GCR, decoder (VOC: 6e-4)
    weight_decay: float = 0.01
    warmup_iters: int = 1500  # VOC value; scaled with iters when it would not fit
    poly_power: float = 0.9
    # loss schedule (VOC values; scaled with iters when they would not fit, see scaled())
    seg_start: int = 2000  # L_seg and L_reg join after this iteration
    label_switch: int = 10000  # L_cre / L_ure labels move from the aux CAM to the CAM (COCO: 50,000)
    ptc_start: int = 0  # COCO: 8,000
    lir_start: int = 0  # COCO: 12,000
    cre_temperature: float = 0.5  # VOC 0.5, COCO 0.1
    w_cre: float = 0.2  # COCO 0.05 (the published COCO run; its script's default is 0.1)
    w_ure: float = 0.1  # COCO 0.0 (the published COCO run; its script's default is 0.01)
    cam_high: float = 0.7  # high threshold of the aux-CAM labels (L_ptc, L_ure) and of PAR (COCO 0.65)
    cam_low: float = 0.25  # their low threshold (also L_cre's aux-CAM labels and PAR's second background)
    cre_high: float = 0.5  # high threshold of L_cre's aux-CAM labels, until the label switch
    lir_high: float = 0.6  # high threshold of the LIR labels (L_cre, L_ure) from the CAM, after the switch
    lir_low: float = 0.35  # their low threshold
    w_ptc: float = 0.3
    w_seg: float = 0.12
    w_reg: float = 0.05
    reg_scale: float = 0.25  # L_reg works at this fraction of the crop (VOC 0.5 of 448)
    reg_sigma_rgb: float = 15.0  # L_reg's colour sigma
    reg_sigma_xy: float = 100.0  # L_reg's spatial sigma in pixels of the crop (the op gets reg_scale x it)
    cam_scales: tuple = (1.0, 0.5)  # VOC (1.0, 0.5, 0.75, 1.5); COCO adds 1.25
    reference_iters: int = 20000  # the recipe's length that the thresholds above refer to
    # evaluation and output
    eval_every: int = 400
    log_every: int = 50
    eval_bkg: float = 0.45  # background score for CAM / aux CAM / LAM label maps in evaluation (VOC 0.5, COCO 0.45)
    num_panels: int = 4  # PNG panels written at each evaluation
    out: str = "runs/default"
    resume: Optional[str] = None
    seed: int = 0
    save_every: int = 200  # checkpoint cadence in iterations, besides evaluations and the end (VOC/COCO: 1,000)
    keep_checkpoints: Optional[int] = None  # keep the newest K and the best by validation LAM mIoU; None: all
    on_bad_sample: str = "stop"  # an unreadable training sample: stop (checkpoint, exit 2) | skip (replace, list)
    # speed
    amp: bool = False  # bf16 autocast (on the CPU only where it is not slower)
    compile: bool = False
    kernels: str = "auto"  # auto | triton | reference
    par_affinity: str = "fp32"  # PAR's stored neighbour weights: fp32 (the published refinement) | bf16 (half the bytes)
    device: str = "auto"  # auto | cpu | cuda
    on_nonfinite: str = "stop"  # stop | skip
    # synthetic data set size (only for data=synthetic)
    synthetic_train: int = 1000
    synthetic_val: int = 100
    tensorboard: bool = False  # also write metrics and panels as TensorBoard events to <out>/tensorboard

    @property
    def total_iters(self) -> int:
        """T of the schedule. `--iters` below it stops a run early without changing its schedule,
        so a run of n iterations resumed to 2n matches a run of 2n ."""
        return self.schedule_iters if self.schedule_iters is not None else max(self.iters, self.recipe_iters)

    def scaled(self, name: str) -> int:
        """An iteration threshold of the recipe, scaled to the schedule when it is shorter."""
        value = getattr(self, name)
        if self.total_iters >= self.reference_iters:
            return value
        return int(round(value * self.total_iters / self.reference_iters))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


VOC_RECIPE = dict(
    data="voc", train_split="train_aug", val_split="val", num_classes=20, crop_size=448,
    backbone="vit_base_patch16_224", iters=20000, recipe_iters=20000, batch_size=4, backbone_lr=6e-5, head_lr=6e-4,
    pretrained="timm:vit_base_patch16_224.orig_in21k_ft_in1k",  # = the published jx_vit_base_p16_224-80ecf9dd.pth
    warmup_iters=1500, seg_start=2000, label_switch=10000, cre_temperature=0.5, w_cre=0.2, w_ure=0.1,
    cam_scales=(1.0, 0.5, 0.75, 1.5), reference_iters=20000, eval_every=2000, log_every=100,
    eval_bkg=0.5, depth=None, decoder_dim=published.DECODER_DIM, reg_scale=0.5, patch_size=None,
    save_every=1000,
)

# The published COCO run, as its log's arguments record it (2 GPUs x 4 images; batch_size is per
# process, so one process takes all 8, and `torchrun --nproc_per_node 2` wants --batch-size 4).
COCO_RECIPE = dict(
    VOC_RECIPE, data="coco", train_split="train", val_split="val", num_classes=80, iters=80000, recipe_iters=80000,
    batch_size=8, reference_iters=80000, ptc_start=8000, lir_start=12000, seg_start=16000, label_switch=50000,
    cre_temperature=0.1, w_cre=0.05, w_ure=0.0, cam_high=0.65, eval_bkg=0.45,
    cam_scales=(1.0, 0.5, 0.75, 1.25, 1.5), eval_every=8000,
)

RECIPES = {"synthetic": {}, "voc": VOC_RECIPE, "coco": COCO_RECIPE}
