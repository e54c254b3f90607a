"""class_patch_attention (docs/METHOD.md, Class-patch attention) alone: reference eager, reference compiled, fused.

ViT-B/16 last block at the production shapes: B = 4, 12 heads, d = 64, R = 4 registers,
K = 20 classes, N = 784 (448 crop) and N = 3136 (896 crop). q and k are slices of a timm-style
qkv tensor (B x T x 3 x heads x d, permuted), as the backbone hands them over. Forward only:
the map is a detached diagnostic. The whole-ViT comparison (explicit attention vs SDPA vs SDPA
+ extraction) lives with the backbone benchmarks.
"""
import pytest
import torch

from common import DEVICE, VARIANTS, measure, op_variant

B, HEADS, HEAD_DIM, R, K = 4, 12, 64, 4, 20
# bf16 is what the training loop feeds; the CPU reference runs fp32 only (bf16 matmuls on the
# CPU measure nothing useful and would double the compile time of the compiled variant)
DTYPES = ("float32", "bfloat16") if DEVICE.type == "cuda" else ("float32",)


def _ideal_bytes(n: int, elt: int, reduce: str) -> float:
    """Class-query rows + the keys the map needs + the fp32 output, each touched once."""
    t = R + K + n
    keys = t if reduce == "mean_softmax" else n  # the softmax normalizes over all T keys
    return B * HEADS * (K + keys) * HEAD_DIM * elt + B * K * n * 4


def _flops(n: int, reduce: str) -> float:
    keys = R + K + n if reduce == "mean_softmax" else n
    return 2.0 * B * HEADS * K * keys * HEAD_DIM


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ("mean_softmax", "sum_logits"))
@pytest.mark.parametrize("n", (784, 3136))
@pytest.mark.parametrize("variant", VARIANTS)
def test_class_patch_attention(benchmark, variant, n, reduce, dtype):
    fn = op_variant("class_patch_attention", variant)
    dt = getattr(torch, dtype)
    t = R + K + n
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, t, 3, HEADS, HEAD_DIM, generator=gen).to(device=DEVICE, dtype=dt)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B x heads x T x d, non-contiguous
    elt = q.element_size()
    with torch.no_grad():
        measure(
            benchmark,
            lambda: fn(q, k, R, K, reduce),
            variant=variant,
            pass_="fwd",
            shape=dict(B=B, heads=HEADS, T=t, d=HEAD_DIM, R=R, K=K, N=n, reduce=reduce, dtype=dtype),
            nbytes=_ideal_bytes(n, elt, reduce),
            flops=_flops(n, reduce),
        )
