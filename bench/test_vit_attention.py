"""The whole ViT forward three ways: explicit attention, SDPA, SDPA + class-patch map.

The MoRe backbone (MoReBackbone, what MoReNet.forward_features runs) at B = 4:
- explicit: attn_impl="explicit", the attention materialized as in the published code;
- sdpa: attn_impl="sdpa" (F.scaled_dot_product_attention in every block);
- sdpa+extract: SDPA, plus the last block's class-patch attention map
  (attn_reduce="mean_softmax", kernels.class_patch_attention with MORE_FAST_KERNELS=auto, the
  Triton kernel on CUDA). The target: within 5% of sdpa alone; extra_info records
  overhead_vs_sdpa_pct from the sdpa case of the same session.

CUDA: ViT-B/16 (vit_base_patch16_224, K = 20, R = 4) at the 448 crop (N = 784) and the 896 crop
(N = 3136), fp32 and bf16 autocast (what the fast training pipeline runs). Forward only, no
grad (the no-grad CAM passes and evaluation; the training step is timed in test_train_step.py).
CPU: the 896 crop of ViT-B takes seconds per call on 2 cores, so the CPU runs a tiny ViT
(vit_tiny_patch16_224) at 64 and 128 instead (the same 1:4 ratio of patch counts), fp32,
marked `cpu_standin` in the shape.
"""
from __future__ import annotations


import pytest
import torch

import kernels
from common import DEVICE, measure, software_info

from more_fast.model.backbone import MoReBackbone

CUDA = DEVICE.type == "cuda"
B, K, R = 4, 20, 4
if CUDA:
    BACKBONE, CASE, CROPS, DTYPES = "vit_base_patch16_224", "production", (448, 896), ("float32", "bfloat16")
else:
    BACKBONE, CASE, CROPS, DTYPES = "vit_tiny_patch16_224", "cpu_standin", (64, 128), ("float32",)
WAYS = {  # way -> (attn_impl, attn_reduce)
    "explicit": ("explicit", None),
    "sdpa": ("sdpa", None),
    "sdpa+extract": ("sdpa", "mean_softmax"),
}
# (crop, dtype) -> median seconds of the sdpa case, for sdpa+extract's overhead
SDPA_MEDIAN: dict[tuple, float] = {}


def _flops(backbone: MoReBackbone, crop: int) -> float:
    """Matmul FLOPs of the blocks: qkv, proj, MLP and the two attention products."""
    t = backbone.num_prefix + (crop // backbone.patch_size) ** 2
    d = backbone.embed_dim
    return B * len(backbone.blocks) * (2 * t * d * d * 12 + 4 * t * t * d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("crop", CROPS)
@pytest.mark.parametrize("way", list(WAYS))
def test_vit_forward(benchmark, way, crop, dtype):
    impl, reduce = WAYS[way]
    torch.manual_seed(0)
    backbone = MoReBackbone(BACKBONE, K, R, attn_impl=impl).to(DEVICE).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3, crop, crop, generator=gen).to(DEVICE)
    amp = dtype == "bfloat16"

    def run():
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp), \
                kernels.use_backend("auto"):
            out = backbone(x, attn_reduce=reduce)
        return out.patch_tokens if reduce is None else out.class_patch_attn

    n = (crop // backbone.patch_size) ** 2
    measure(benchmark, run, variant=way, pass_="fwd",
            shape=dict(case=CASE, backbone=BACKBONE, B=B, crop=crop, N=n, T=n + K + R, dtype=dtype),
            flops=_flops(backbone, crop), warmup=2 if CUDA else 1)
    info = benchmark.extra_info
    median = benchmark.stats.stats.median
    info.update(attn_impl=impl, attn_reduce=reduce, **software_info())
    if not CUDA:
        info["threads"] = torch.get_num_threads()
    if reduce is not None:
        info["class_patch_attention_backend"] = kernels.resolve_backend("class_patch_attention", DEVICE)
    if way == "sdpa":
        SDPA_MEDIAN[(crop, dtype)] = median
    if way == "sdpa+extract":
        base = SDPA_MEDIAN.get((crop, dtype))
        info["overhead_vs_sdpa_pct"] = round(100 * (median / base - 1), 2) if base else None
    del backbone
