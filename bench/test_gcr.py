"""gcr_aggregate (docs/METHOD.md, GCR) alone: reference eager, reference compiled, fused.

Production shapes: B = 4, N = 784 patches (448 crop), D = 768, K = 20 (VOC, k = 10) and
K = 80 (COCO, k = 40); L = K + N nodes. "published" score (the default). Forward, and forward
+ backward into both h and e (as in training: h = head_proj(T), e = tail_proj(X) both need
gradients).

Edge distributions (fwd+bwd): "uniform" (random h: the K k edges spread over the L nodes) and
"hub", the start of training: class tokens start as copies of one token, so every class row
picks the same k nodes and all K k edges land on them, K each (a node takes at most one edge
per class row: the most concentrated distribution the op allows). The backward's node kernel
splits its work by edges, not node rows, so both should take about the same time.

Throughput counts:
- bytes: an ideal kernel reads h and e once and writes M (forward); the backward adds reading
  the incoming gradient and writing dh and de (the gathered neighbour rows come from cache);
- FLOPs: the logits h e^T (2 B K L D) plus the per-edge elementwise work, counted as 8 B K k D
  forward (u, tanh, two sums, the weighted sum) and 24 B K k D more for the backward.
"""
import pytest
import torch

from common import DEVICE, VARIANTS, fwd_bwd, measure, op_variant

B, N, D = 4, 784, 768
CLASSES = (20, 80)
SCORE = "published"
# bf16 is what the training loop feeds (autocast); the CPU reference runs fp32 only
DTYPES = ("float32", "bfloat16") if DEVICE.type == "cuda" else ("float32",)


def _topk(ncls: int) -> int:
    return int(0.5 * ncls)


def _ideal_bytes(ncls: int, elt: int, backward: bool) -> float:
    nodes = ncls + N
    fwd = (2 * B * ncls * D + B * nodes * D) * elt  # h, e in; M out
    if not backward:
        return fwd
    return fwd + (2 * B * ncls * D + B * nodes * D) * elt  # dM in; dh, de out


def _flops(ncls: int, backward: bool) -> float:
    nodes, k = ncls + N, _topk(ncls)
    edges = B * ncls * k * D
    return 2.0 * B * ncls * nodes * D + 8.0 * edges + (24.0 * edges if backward else 0.0)


def _inputs(ncls: int, dtype: str, requires_grad: bool, edges: str = "uniform"):
    gen = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, dtype)
    scale = 0.5 / D ** 0.25
    h = torch.randn(B, ncls, D, generator=gen) * scale
    if edges == "hub":
        h = h[:, :1].expand(B, ncls, D).contiguous()
    h = h.to(device=DEVICE, dtype=dt)
    e = (torch.randn(B, ncls + N, D, generator=gen) * scale).to(device=DEVICE, dtype=dt)
    return h.requires_grad_(requires_grad), e.requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ncls", CLASSES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gcr_aggregate_fwd(benchmark, variant, ncls, dtype):
    fn = op_variant("gcr_aggregate", variant)
    h, e = _inputs(ncls, dtype, requires_grad=False)
    k = _topk(ncls)
    with torch.no_grad():
        measure(
            benchmark,
            lambda: fn(h, e, k, SCORE),
            variant=variant,
            pass_="fwd",
            shape=dict(B=B, K=ncls, N=N, L=ncls + N, D=D, k=k, score=SCORE, dtype=dtype),
            nbytes=_ideal_bytes(ncls, h.element_size(), backward=False),
            flops=_flops(ncls, backward=False),
        )


@pytest.mark.parametrize("edges", ("uniform", "hub"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ncls", CLASSES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gcr_aggregate_fwd_bwd(benchmark, variant, ncls, dtype, edges):
    fn = op_variant("gcr_aggregate", variant)
    h, e = _inputs(ncls, dtype, requires_grad=True, edges=edges)
    k = _topk(ncls)
    measure(
        benchmark,
        fwd_bwd(lambda: fn(h, e, k, SCORE), h, e),
        variant=variant,
        pass_="fwd+bwd",
        shape=dict(B=B, K=ncls, N=N, L=ncls + N, D=D, k=k, score=SCORE, dtype=dtype, edges=edges),
        nbytes=_ideal_bytes(ncls, h.element_size(), backward=True),
        flops=_flops(ncls, backward=True),
    )
