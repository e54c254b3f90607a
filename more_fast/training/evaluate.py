"""Validation: mIoU of CAM, aux CAM, LAM and decoder (docs/METHOD.md, Validation during training) and PNG panels."""
from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .. import cam as C
from ..artifacts import ArtifactMeter
from ..data import normalize, voc_palette
from ..model.network import MoReNet
from ..data.palette import IGNORE_INDEX as IGNORE

MAP_NAMES = ("cam", "aux_cam", "lam", "decoder")


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K+1) x (K+1) counts, rows = ground truth, ignoring 255."""
    keep = target != IGNORE
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: torch.Tensor) -> tuple[float, list[float]]:
    """Mean IoU over the classes that occur in prediction or ground truth."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / union.clamp_min(1)
    present = union > 0
    return float(iou[present].mean()) if present.any() else 0.0, iou.tolist()


@torch.no_grad()
def predict(model: MoReNet, images_u8: torch.Tensor, cls_labels: torch.Tensor, scales: Sequence[float],
            bkg: float, features: Optional[Callable] = None, amp_dtype=None) -> dict[str, torch.Tensor]:
    """Label maps (B x H x W) of CAM, aux CAM, LAM (with the given image labels) and the decoder,
    plus the normalized maps themselves (for panels), the last block's class-patch attention
    ("attention", B x K x N, from the fused extraction), the single-scale LAM on the grid
    ("lam_grid", B x K x N), the logits and the grid."""
    x = normalize(images_u8)
    size = x.shape[-2:]
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        # the unflipped scale-1.0 pass (the compiled backbone where given), reused by the multi-scale maps
        feats = (features or model.forward_features)(x, attn_reduce="mean_softmax")
        out = model.forward_head(feats)
        reuse = model.cams(out) + (C.lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid),)
        maps = C.multiscale_maps(model, x, scales, reuse=reuse, with_lam=True, backbone=features)
        seg = out.seg
    extra = {"attention": out.class_patch_attn, "lam_grid": reuse[2].flatten(2), "logits": out.logits,
             "grid": out.grid}
    out = {name: C.map_prediction(maps[name], cls_labels, bkg) for name in ("cam", "aux_cam", "lam")}
    out["decoder"] = C.seg_prediction(seg, size)
    out["maps"] = maps
    out.update(extra)
    return out


@torch.no_grad()
def evaluate(model: MoReNet, loader, num_classes: int, device: torch.device, scales: Sequence[float],
             bkg: float, features: Optional[Callable] = None, amp_dtype=None, panel_dir: Optional[pathlib.Path] = None,
             num_panels: int = 0, artifacts: Optional[ArtifactMeter] = None) -> dict[str, float]:
    """mIoU (percent) of each map on the loader's split, and of the all-background baseline.
    `artifacts`: a meter that also collects the artifact ratios (more_fast/artifacts.py)."""
    was_training = model.training
    model.eval()
    k1 = num_classes + 1
    confs = {name: torch.zeros(k1, k1, dtype=torch.int64, device=device) for name in MAP_NAMES + ("background",)}
    panels_left = num_panels
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        cls_labels = batch["cls_label"].to(device, non_blocking=True)
        pred = predict(model, images, cls_labels, scales, bkg, features, amp_dtype)
        for name in MAP_NAMES:
            confs[name] += confusion(pred[name], masks, k1)
        confs["background"] += confusion(torch.zeros_like(masks), masks, k1)
        if artifacts is not None:
            artifacts.update(masks, pred["grid"], pred["attention"], pred["lam_grid"])
        if panel_dir is not None and panels_left > 0:
            n = min(panels_left, images.shape[0])
            write_panels(panel_dir, batch["name"][:n], images[:n], pred, cls_labels[:n], masks[:n])
            panels_left -= n
    if dist.is_available() and dist.is_initialized():
        for conf in confs.values():
            dist.all_reduce(conf)
    if artifacts is not None:
        artifacts.all_reduce()
    model.train(was_training)
    return {name: 100.0 * miou(conf)[0] for name, conf in confs.items()}


def _heat(m: np.ndarray) -> np.ndarray:
    """H x W in [0, 1] -> H x W x 3 uint8, a blue-to-red colour ramp."""
    m = np.clip(m, 0, 1)
    return (np.stack([m, 1 - np.abs(2 * m - 1), 1 - m], axis=-1) * 255).astype(np.uint8)


def _colour(label: np.ndarray) -> np.ndarray:
    return voc_palette()[label.astype(np.int64)].astype(np.uint8)


def _top_class_attention(pred: dict, i: int, present: torch.Tensor, size) -> np.ndarray:
    """H x W in [0, 1]: image i's class-patch attention of its top present class, at the image size."""
    logits = pred["logits"][i].float()
    if present.any():
        logits = logits.masked_fill(~present, float("-inf"))
    top = int(logits.argmax())
    attn = pred["attention"][i, top].float().reshape(1, 1, *pred["grid"])
    attn = torch.nn.functional.interpolate(attn, size=tuple(size), mode="bilinear", align_corners=False)
    return C.minmax_normalize(attn)[0, 0].cpu().numpy()


def write_panels(folder: pathlib.Path, names: Sequence[str], images: torch.Tensor, pred: dict,
                 cls_labels: torch.Tensor, masks: torch.Tensor) -> None:
    """One PNG per image: image | CAM | LAM | class-patch attention | CAM pseudo label | decoder
    prediction | ground truth. The attention column is the last block's class-patch attention of
    the top present class (the present class with the highest logit), min-max normalized."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        present = cls_labels[i] > 0
        cam = (pred["maps"]["cam"][i] * present[:, None, None]).amax(0).cpu().numpy()
        lam = (pred["maps"]["lam"][i] * present[:, None, None]).amax(0).cpu().numpy()
        tiles = [images[i].permute(1, 2, 0).cpu().numpy().astype(np.uint8), _heat(cam), _heat(lam)]
        if pred.get("attention") is not None:
            tiles.append(_heat(_top_class_attention(pred, i, present, images.shape[-2:])))
        tiles += [_colour(pred["cam"][i].cpu().numpy()), _colour(pred["decoder"][i].cpu().numpy()),
                  _colour(masks[i].cpu().numpy())]
        Image.fromarray(np.concatenate(tiles, axis=1)).save(folder / f"{name}.png")


def format_table(results: dict[str, float], iteration: int) -> str:
    rows = [f"mIoU (%) at iteration {iteration}", f"  {'map':<22}{'mIoU':>8}"]
    labels = {"cam": "CAM (pseudo labels)", "aux_cam": "aux CAM", "lam": "LAM", "decoder": "decoder",
              "background": "all-background"}
    for name in MAP_NAMES + ("background",):
        rows.append(f"  {labels[name]:<22}{results[name]:>8.2f}")
    return "\n".join(rows)
