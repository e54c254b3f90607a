"""The whole MoRe training step: reference pipeline against fast pipeline.

One `TrainStep.step(it, batch)` is forward, the no-grad multi-scale CAM passes, the labels
(including PAR pseudo labels), every loss (docs/METHOD.md, Losses) and AdamW. Two pipelines:

- reference: fp32, explicit attention (the published way), MORE_FAST_KERNELS=reference, eager;
- fast: bf16 autocast, SDPA, MORE_FAST_KERNELS=auto (the Triton kernels on CUDA), torch.compile.

CUDA: ViT-B/16 (vit_base_patch16_224), B = 4, 448 crop, K = 20, R = 4, CAM scales
(1.0, 0.5, 0.75, 1.5): the VOC recipe's step, about 7 TFLOP (MoReNet.train_step_flops).
CPU: the same step with a tiny ViT (vit_tiny_patch16_224), B = 2, 64 crop, so it stays cheap.
On the CPU the fast pipeline runs without torch.compile (compiling the whole step takes minutes
on 2 cores, measured ~290 s for the first step) and without autocast (a tiny model at 64 px is
dominated by fp32 label / PAR work; bf16 gave no measurable gain), and MORE_FAST_KERNELS=auto
resolves to the reference ops there (Triton is timed on CUDA only); extra_info says so.

Both cases use the same random uint8 images and random multi-hot labels (at least one class per
image), already on the device (data loading is not timed). The iteration index is fixed at
cfg.total_iters // 2, past the (scaled) seg start, so the full loss set (L_seg, L_reg and PAR
included) runs in every round; the optimizer still steps, so the weights move between rounds.
Compilation and autotuning happen in warm-up steps outside the timed rounds.

Recorded per case (extra_info): img_per_s, step_ms, step_TFLOP, TFLOP/s, MFU_pct (where
telemetry.peak_flops knows the GPU; against its dense bf16 peak, for both pipelines), peak
memory on CUDA (peak_mem_MiB: everything allocated, model and optimizer state included), and for
the fast case speedup_vs_reference, from the reference case of the same session.
"""
from __future__ import annotations

import gc

import pytest
import torch

import kernels
from common import DEVICE, measure, software_info, sync

from more_fast.model.network import MoReNet
from more_fast.training.config import VOC_RECIPE, TrainConfig
from more_fast.training.loop import TERMS, TrainStep, loss_weights
from more_fast.training.telemetry import peak_flops

CUDA = DEVICE.type == "cuda"
FUSED_OPS = ("affinity_loss", "lir_loss", "gcr_aggregate", "class_patch_attention", "par_refine", "dense_energy_loss")
K, R = 20, 4
SCALES = (1.0, 0.5, 0.75, 1.5)
if CUDA:
    BACKBONE, CROP, B = "vit_base_patch16_224", 448, 4
else:
    BACKBONE, CROP, B = "vit_tiny_patch16_224", 64, 2

PIPELINES = {
    "reference": dict(amp=False, compile=False, kernels="reference", attn_impl="explicit"),
    "fast": dict(amp=CUDA, compile=CUDA, kernels="auto", attn_impl="sdpa"),
}
CPU_NOTES = {
    "fast": "CPU: no torch.compile (compiling the whole step takes minutes on 2 cores, >60 s budget); "
            "no autocast (no measurable gain for a tiny ViT at 64 px); kernels=auto resolves to the "
            "reference ops on the CPU (Triton is timed on CUDA only)",
}
# rounds / warm-up steps per pipeline: the compiled step compiles (and may recompile once for
# the dynamic CAM-scale shapes) in its first steps
ROUNDS = {"reference": 5, "fast": 10} if CUDA else {"reference": 2, "fast": 2}
WARMUP = {"reference": 2, "fast": 3} if CUDA else {"reference": 1, "fast": 1}

# pipeline -> {"img_per_s": ..., "step_ms": ...} of this session, so that the fast case can
# report its speedup over the reference measured in the same run
RESULTS: dict[str, dict] = {}


def make_batch(seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    image = torch.randint(0, 256, (B, 3, CROP, CROP), dtype=torch.uint8, generator=gen)
    labels = (torch.rand(B, K, generator=gen) < 0.15).float()
    labels[torch.arange(B), torch.randint(0, K, (B,), generator=gen)] = 1.0  # at least one class
    return {"image": image.to(DEVICE), "cls_label": labels.to(DEVICE)}


def make_config(pipeline: str) -> TrainConfig:
    recipe = {**VOC_RECIPE, "data": "synthetic"}  # the published step: ViT widths, decoder, L_reg scale
    return TrainConfig(**{**recipe, "backbone": BACKBONE, "num_classes": K, "num_registers": R, "crop_size": CROP,
                          "batch_size": B, "cam_scales": SCALES, "device": DEVICE.type, **PIPELINES[pipeline]})


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_train_step(benchmark, pipeline):
    cfg = make_config(pipeline)
    torch.manual_seed(0)
    model = MoReNet(cfg.backbone, cfg.num_classes, cfg.num_registers, cfg.topk_ratio, cfg.gcr_score,
                    attn_impl=cfg.attn_impl, depth=cfg.depth, decoder_dim=cfg.decoder_dim,
                    patch_size=cfg.patch_size).to(DEVICE).train()
    trainer = TrainStep(model, cfg, DEVICE)
    batch = make_batch()
    it = cfg.total_iters // 2
    weights = loss_weights(cfg, it)
    assert {"seg", "reg", "ptc", "cre", "ure"} <= set(weights), f"iteration {it} misses losses: {sorted(weights)}"
    state = {}

    def step():
        total, terms = trainer.step(it, batch)
        state["terms"] = terms
        return total

    try:
        measure(benchmark, step, variant=pipeline, pass_="train_step",
                shape=dict(backbone=BACKBONE, B=B, crop=CROP, K=K, R=R, scales=list(SCALES), it=it),
                rounds=ROUNDS[pipeline], warmup=WARMUP[pipeline])
        sync()
        info = benchmark.extra_info
        if CUDA:
            info["peak_mem_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        terms = state["terms"]
        assert set(terms) == {t for t in TERMS if t in weights}, sorted(terms)
        nonfinite = [name for name, value in terms.items() if not bool(torch.isfinite(value))]
        flops = model.train_step_flops(CROP, B, SCALES)
        median = benchmark.stats.stats.median
        peak = peak_flops(DEVICE)
        info.update(
            img_per_s=round(B / median, 3),
            step_ms=round(median * 1e3, 3),
            step_TFLOP=round(flops / 1e12, 4),
            **{"TFLOP/s": _sig(flops / median / 1e12)},
            MFU_pct=round(100 * flops / median / peak, 2) if peak else None,
            mfu_basis="dense bf16 peak of the GPU (telemetry.PEAK_BF16)" if peak else "n/a (unknown peak)",
            amp=trainer.amp_note,
            compile=cfg.compile,
            attn_impl=cfg.attn_impl,
            kernels=cfg.kernels,
            op_backends={op: kernels.resolve_backend(op, DEVICE) for op in FUSED_OPS},
            loss_terms=sorted(terms),
            nonfinite_terms=nonfinite,
            warmup_steps=WARMUP[pipeline],
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            **software_info(),
        )
        if not CUDA:
            info["threads"] = torch.get_num_threads()
        if not CUDA and pipeline in CPU_NOTES:
            info["note"] = CPU_NOTES[pipeline]
        RESULTS[pipeline] = {"img_per_s": B / median, "step_ms": median * 1e3}
        if pipeline != "reference":
            ref = RESULTS.get("reference")
            info["speedup_vs_reference"] = round(ref["step_ms"] / (median * 1e3), 3) if ref else None
            if ref is None:
                info["speedup_note"] = "the reference case did not run in this session"
        assert not nonfinite, f"non-finite loss terms {nonfinite}"
    finally:
        del trainer, model, state
        if cfg.compile:
            torch._dynamo.reset()
        _free()

