"""kernels.gcr (Triton: compiled on CUDA, the interpreter on the CPU; tests/helpers.DEVICE)
against kernels.reference.gcr_aggregate.

The oracle is the reference run in float64 on upcast copies of the same inputs; values and
both input gradients (h and e) are compared by ||fused - ref|| / ||ref|| within
tol("gcr", dtype) (tests/helpers.py): fp32 1e-5 on the interpreter, fp16 1e-2, bf16 2e-2
(8 significant bits; it runs on the interpreter too, where the kernels upcast bf16 tiles before
tl.dot), fp64 1e-12 (the kernels then compute in fp64, which checks the hand-derived gradient to
rounding). Measured on the interpreter: fp32 <= 2.6e-6, fp16 <= 2.6e-4, bf16 <= 3.6e-3,
fp64 <= 1.6e-15. Production-shape cases carry the `gpu` marker.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from helpers import DEVICE, rel as _rel, tol, force_backend
from kernels import gcr, reference

SCORES = ("published", "dot")
F32_TOL = tol("gcr", torch.float32)


def _inputs(b, ncls, n, d, dtype, device=DEVICE, seed=0):
    """Fresh random h (B x K x D), e (B x (K+N) x D) and an upstream gradient for M.

    Scale 0.5 / D^(1/4) keeps the scores s at |s| <~ 30 and the score softmax a away from
    one-hot. That matters for fp32: a = softmax(s) turns the rounding of s (~1e-7 |s|) into a
    relative error of a, and dh is made of the small entries of a, so fp32 gradients carry
    ~1e-7 max|s| relative error whatever the implementation (at scale 1.2, |s| ~ 170 in the
    "published" mode: the kernels' dh is off by ~2e-5 there, the reference's own fp32
    autograd by ~1e-4)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 / d ** 0.25
    h = (torch.randn(b, ncls, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    e = (torch.randn(b, ncls + n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    gm = torch.randn(b, ncls, d, generator=gen, dtype=torch.float64).to(dtype)
    return h.to(device), e.to(device), gm.to(device)


def _reference(h, e, gm, k, score):
    h64 = h.detach().double().requires_grad_()
    e64 = e.detach().double().requires_grad_()
    m = reference.gcr_aggregate(h64, e64, k, score)
    dh, de = torch.autograd.grad(m, (h64, e64), gm.double())
    return m, dh, de


def _fused(h, e, gm, k, score):
    h = h.detach().clone().requires_grad_()
    e = e.detach().clone().requires_grad_()
    m = gcr.gcr_aggregate(h, e, k, score)
    dh, de = torch.autograd.grad(m, (h, e), gm)
    return m, dh, de


def _check(b, ncls, n, d, k, score, dtype, device=DEVICE):
    h, e, gm = _inputs(b, ncls, n, d, dtype, device)
    m, dh, de = _fused(h, e, gm, k, score)
    assert m.dtype == dtype and dh.dtype == dtype and de.dtype == dtype
    assert m.shape == h.shape and dh.shape == h.shape and de.shape == e.shape
    m_ref, dh_ref, de_ref = _reference(h, e, gm, k, score)
    bound = tol("gcr", dtype)
    errs = {"M": _rel(m, m_ref), "dh": _rel(dh, dh_ref), "de": _rel(de, de_ref)}
    assert all(v <= bound for v in errs.values()), errs
    return errs


# (B, K, N, D, k): base; k = 1 is separate (its dh is exactly zero); k = K + N; K = 1;
# odd sizes with K > 16 (two logits row blocks); k = 40 with D = 300 (several D chunks in
# every kernel).
SHAPES = [
    (2, 3, 13, 20, 4),
    (1, 3, 13, 20, 16),
    (2, 1, 13, 20, 5),
    (2, 17, 150, 45, 9),
    (1, 6, 40, 300, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}K{}N{}D{}k{}".format(*s))
def test_matches_reference(shape, score, dtype):
    _check(*shape, score, dtype)


@pytest.mark.parametrize("score", SCORES)
def test_fp64_gradient_to_rounding(score):
    """fp64 inputs run the kernels in fp64: the hand-derived backward equals autograd."""
    _check(2, 5, 27, 24, 7, score, torch.float64)
    _check(1, 17, 30, 37, 47, score, torch.float64)  # k = K + N


@pytest.mark.parametrize("score", SCORES)
def test_bf16(score):
    _check(2, 5, 27, 24, 7, score, torch.bfloat16)


@pytest.mark.parametrize("score", SCORES)
def test_k1_selects_the_best_node(score):
    """k = 1: M is the best node's row, and h gets no gradient (both softmaxes are constant)."""
    h, e, gm = _inputs(2, 3, 13, 20, torch.float32)
    m, dh, de = _fused(h, e, gm, 1, score)
    m_ref, _, de_ref = _reference(h, e, gm, 1, score)
    best = (h.double() @ e.double().transpose(1, 2)).argmax(-1)
    assert torch.equal(m, e[torch.arange(2, device=DEVICE)[:, None], best])
    assert _rel(m, m_ref) == 0.0
    assert torch.equal(dh, torch.zeros_like(dh))
    assert _rel(de, de_ref) <= 1e-6


@pytest.mark.parametrize("score", SCORES)
def test_coco_shape(score):
    """K = 80, N = 784, k = 40 (COCO), small D: many edges per node, several CSR chunks."""
    _check(1, 80, 784, 32, 40, score, torch.float32)


def test_voc_shape_full_width():
    """K = 20, N = 784, D = 768, k = 10 (VOC)."""
    _check(1, 20, 784, 768, 10, "published", torch.float32)


def test_topk_matches_torch_and_multi_tile_merge():
    """The saved indices are torch.topk's on distinct logits, with one tile or many."""
    h, e, _ = _inputs(1, 3, 200, 16, torch.float32)
    k = 23
    ref_idx = (h.double() @ e.double().transpose(1, 2)).topk(k, dim=-1).indices
    m_ref = reference.gcr_aggregate(h.double(), e.double(), k, "dot")
    for block_l in (None, 16, 64):  # one tile of 256; 13 tiles (< k each); 4 tiles
        m, idx, p, a = gcr._forward(h, e, k, "dot", block_l=block_l)
        assert torch.equal(idx.long(), ref_idx), block_l  # same order too: largest first
        assert _rel(m, m_ref) <= F32_TOL
        ones = torch.ones(1, 3, device=DEVICE)
        assert torch.allclose(p.sum(-1), ones) and torch.allclose(a.sum(-1), ones)


@pytest.mark.parametrize("score", SCORES)
def test_device_block_sizes(monkeypatch, score):
    """The GPU launch configuration (smaller tiles: 10 D chunks per row here, 32-row node
    blocks, 32-edge chunks, 64 x 32 logits tiles) under the interpreter."""
    monkeypatch.setattr(gcr, "_interpreted", lambda t: False)
    _check(2, 6, 70, 300, 40, score, torch.float32)


def test_ties_pick_the_lower_index():
    """Equal logits (duplicated node rows): the lower node index is taken first."""
    h, e, _ = _inputs(1, 2, 10, 8, torch.float32)
    e[0, 7] = e[0, 3]
    e[0, 9] = e[0, 3]
    h[0, 0] = e[0, 3]  # node 3 (and its copies 7, 9) are the best for class row 0
    _, idx, _, _ = gcr._forward(h, e, 2, "published")
    assert idx[0, 0].tolist() == [3, 7]


def test_strided_inputs_and_gradient():
    """Non-contiguous h, e and an expanded (stride-0) upstream gradient: nothing is copied."""
    b, ncls, n, d, k = 2, 4, 21, 24, 6
    h0, e0, _ = _inputs(b, ncls, n, d, torch.float32)
    h_big = torch.randn(b, d, ncls, device=DEVICE).transpose(1, 2)  # B x K x D, strides (., 1, K)
    h_big.copy_(h0)
    e_big = torch.randn(b, ncls + n, 2 * d, device=DEVICE)
    e_big[..., ::2] = e0
    e_view = e_big[..., ::2]  # stride 2 along D
    gm = torch.randn(1, 1, d, device=DEVICE).expand(b, ncls, d)
    m, dh, de = _fused(h_big, e_view, gm, k, "published")
    m_ref, dh_ref, de_ref = _reference(h0, e0, gm, k, "published")
    assert max(_rel(m, m_ref), _rel(dh, dh_ref), _rel(de, de_ref)) <= F32_TOL


def test_backward_writes_every_row_and_is_repeatable():
    """Unselected nodes get exact zeros (the output starts uninitialized); two runs agree
    bit for bit."""
    h, e, gm = _inputs(2, 3, 60, 20, torch.float32)
    k = 4
    _, idx, _, _ = gcr._forward(h, e, k, "dot")
    _, _, de1 = _fused(h, e, gm, k, "dot")
    _, _, de2 = _fused(h, e, gm, k, "dot")
    assert torch.equal(de1, de2)
    selected = torch.zeros(2, 63, dtype=torch.bool, device=DEVICE)
    selected[torch.arange(2, device=DEVICE)[:, None], idx.reshape(2, -1).long()] = True
    assert torch.equal(de1[~selected], torch.zeros_like(de1[~selected]))
    assert (de1[selected].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("score", SCORES)
def test_backward_hub_nodes(monkeypatch, score):
    """The start of training: every class row is the same token, so all K k edges land on the
    same k nodes (K each). With the GPU node configuration (32-edge sub-chunks, 64-edge chunks)
    a node's 40 edges cross sub-chunk and chunk boundaries: partial sums carried, each row
    written once. Matches the reference; repeatable bit for bit."""
    monkeypatch.setattr(gcr, "_interpreted", lambda t: False)
    ncls, k = 40, 5
    h, e, gm = _inputs(2, ncls, 30, 20, torch.float32)
    h = h[:, :1].expand_as(h).contiguous()
    _, idx, _, _ = gcr._forward(h, e, k, score)
    assert (idx == idx[:, :1]).all()  # one set of k nodes per image
    m, dh, de = _fused(h, e, gm, k, score)
    m_ref, dh_ref, de_ref = _reference(h, e, gm, k, score)
    assert max(_rel(m, m_ref), _rel(dh, dh_ref), _rel(de, de_ref)) <= 1e-5
    assert torch.equal(de, _fused(h, e, gm, k, score)[2])


def test_public_dispatch(monkeypatch):
    force_backend(monkeypatch, "triton")
    assert kernels.resolve_backend("gcr_aggregate", DEVICE) == "triton"
    h, e, gm = _inputs(1, 3, 13, 20, torch.float32)
    out = kernels.gcr_aggregate(h, e, 4, "dot")
    assert torch.equal(out, gcr.gcr_aggregate(h, e, 4, "dot"))
    with pytest.raises(ValueError, match="k"):
        kernels.gcr_aggregate(h, e, 17, "dot")


def test_torch_compile_fullgraph(monkeypatch):
    force_backend(monkeypatch, "triton")
    h, e, gm = _inputs(2, 5, 19, 24, torch.float32)
    k = 6

    def f(h, e):
        return kernels.gcr_aggregate(h, e, k, "published") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    hc, ec = h.clone().requires_grad_(), e.clone().requires_grad_()
    out = compiled(hc, ec)
    (out * gm).sum().backward()
    m_ref, dh_ref, de_ref = _reference(h, e, gm * 2.0, k, "published")
    assert _rel(out, 2.0 * m_ref) <= F32_TOL
    assert _rel(hc.grad, dh_ref) <= F32_TOL
    assert _rel(ec.grad, de_ref) <= F32_TOL


# ------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("shape", [(4, 20, 784, 768, 10), (4, 80, 784, 768, 40), (2, 17, 150, 45, 9)])
def test_gpu_matches_reference(shape, score, dtype):
    _check(*shape, score, dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_deterministic():
    h, e, gm = _inputs(4, 80, 784, 768, torch.bfloat16, device="cuda")
    runs = [_fused(h, e, gm, 40, "published") for _ in range(3)]
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_long_rows():
    """L > 1024: several top-k tiles on the GPU (the 896 crop, N = 3136)."""
    _check(2, 20, 3136, 768, 10, "published", torch.float32, device="cuda")


def test_sqrt_scale_matches():
    """A = h e^T / sqrt(D) exactly as the reference scales it (fp64 keeps the check tight)."""
    h, e, _ = _inputs(1, 2, 5, 9, torch.float64)
    _, idx, p, _ = gcr._forward(h, e, 7, "dot")
    logits = h @ e.transpose(1, 2) / math.sqrt(9)
    w, ref_idx = logits.topk(7, dim=-1)
    assert torch.equal(idx.long(), ref_idx)
    assert torch.allclose(p, w.softmax(-1), rtol=1e-13, atol=0)
