"""kernels.reference: hand-checkable cases, independent re-derivations, gradchecks, edge cases."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import force_backend
from kernels import reference as R

f64 = torch.float64


# ------------------------------------------------------------------ affinity_loss (L_ptc)
def test_affinity_loss_hand_case():
    # three unit tokens of one image: t0 = t1 (cos 1), t2 orthogonal to t0 and at 45 degrees... use exact values
    t = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]]], dtype=f64)
    lab = torch.tensor([[1, 1, 2]])
    # pairs i != j: (0,1),(1,0) positive with |cos| = 1; (0,2),(2,0),(1,2),(2,1) negative with |cos| = 1/sqrt2
    s_pos, n_pos = 2.0, 2
    s_neg, n_neg = 4 / math.sqrt(2), 4
    expected = 0.5 * (1 - s_pos / (n_pos + 1)) + 0.5 * s_neg / (n_neg + 1)
    assert R.affinity_loss(t, lab, 255).item() == pytest.approx(expected, rel=1e-12)


def _affinity_loops(tokens, labels, ignore=255):
    """Pair-by-pair re-derivation of L_ptc (docs/METHOD.md, L_ptc)."""
    s_pos = s_neg = 0.0
    n_pos = n_neg = 0
    b, n, _ = tokens.shape
    for bi, i, j in itertools.product(range(b), range(n), range(n)):
        li, lj = int(labels[bi, i]), int(labels[bi, j])
        if i == j or li == ignore or lj == ignore:
            continue
        c = abs(F.cosine_similarity(tokens[bi, i], tokens[bi, j], dim=0, eps=1e-8).item())
        if li == lj:
            s_pos, n_pos = s_pos + c, n_pos + 1
        else:
            s_neg, n_neg = s_neg + c, n_neg + 1
    return 0.5 * (1 - s_pos / (n_pos + 1)) + 0.5 * s_neg / (n_neg + 1)


def test_affinity_loss_matches_pairwise_loops():
    t = torch.randn(2, 7, 5, dtype=f64)
    lab = torch.randint(0, 3, (2, 7))
    lab[0, 2] = 255
    assert R.affinity_loss(t, lab, 255).item() == pytest.approx(_affinity_loops(t, lab), rel=1e-10)


def test_affinity_loss_edge_cases():
    t = torch.randn(2, 5, 4, dtype=f64)
    all_ignored = torch.full((2, 5), 255)
    assert R.affinity_loss(t, all_ignored, 255).item() == pytest.approx(0.5)  # no pair at all
    distinct = torch.arange(10).reshape(2, 5)  # no positive pair
    assert R.affinity_loss(t, distinct, 255).item() == pytest.approx(_affinity_loops(t, distinct), rel=1e-10)
    same = torch.ones(2, 5, dtype=torch.long)  # no negative pair
    assert R.affinity_loss(t, same, 255).item() == pytest.approx(_affinity_loops(t, same), rel=1e-10)


def test_affinity_loss_gradcheck():
    t = torch.randn(2, 6, 4, dtype=f64, requires_grad=True)
    lab = torch.randint(0, 3, (2, 6))
    lab[1, 0] = 255
    assert torch.autograd.gradcheck(lambda x: R.affinity_loss(x, lab, 255), (t,))


# ------------------------------------------------------------------ lir_loss (L_cre)
def _lir_loops(q, p, labels, cls_labels, t):
    b, k, _ = q.shape
    total = 0.0
    for bi, c in itertools.product(range(b), range(k)):
        if cls_labels[bi, c] == 0:
            continue
        qn = q[bi, c] / q[bi, c].norm()
        z = (p[bi] @ qn) / t
        logp = z - torch.logsumexp(z, 0)
        members = (labels[bi] == c + 1).nonzero().flatten()
        if len(members):
            total += -logp[members].mean().item()
    return total / b


def test_lir_loss_matches_loops_and_class_without_patch():
    q, p = torch.randn(2, 4, 6, dtype=f64), torch.randn(2, 9, 6, dtype=f64)
    labels = torch.randint(0, 4, (2, 9))  # class 3 (label 4) has no patch
    cls = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    assert R.lir_loss(q, p, labels, cls, 0.5).item() == pytest.approx(_lir_loops(q, p, labels, cls, 0.5), rel=1e-10)


def test_lir_loss_patch_tokens_get_no_gradient_and_gradcheck():
    q = torch.randn(2, 3, 5, dtype=f64, requires_grad=True)
    p = torch.randn(2, 8, 5, dtype=f64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 8))
    cls = torch.ones(2, 3)
    R.lir_loss(q, p, labels, cls, 0.5).backward()
    assert p.grad is None and q.grad is not None
    assert torch.autograd.gradcheck(lambda x: R.lir_loss(x, p.detach(), labels, cls, 0.3), (q.detach().requires_grad_(),))


def test_lir_loss_large_logits_stay_finite():
    q = torch.randn(1, 2, 4, dtype=torch.float32)
    p = torch.randn(1, 6, 4) * 1e3  # logits ~1e3 / t: exp would overflow
    labels = torch.tensor([[1, 1, 2, 0, 2, 1]])
    loss = R.lir_loss(q, p, labels, torch.ones(1, 2), 0.5)
    ref = R.lir_loss(q.double(), p.double(), labels, torch.ones(1, 2), 0.5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_lir_loss_k1():
    q, p = torch.randn(1, 1, 3, dtype=f64), torch.randn(1, 5, 3, dtype=f64)
    labels = torch.tensor([[1, 0, 1, 255, 1]])
    cls = torch.ones(1, 1)
    assert R.lir_loss(q, p, labels, cls, 0.5).item() == pytest.approx(_lir_loops(q, p, labels, cls, 0.5), rel=1e-10)


# ------------------------------------------------------------------ gcr_aggregate
def _gcr_loops(h, e, k, score):
    b, kk, d = h.shape
    m = torch.zeros_like(h)
    for bi, i in itertools.product(range(b), range(kk)):
        a = torch.stack([h[bi, i] @ e[bi, j] / math.sqrt(d) for j in range(e.shape[1])])
        order = sorted(range(len(a)), key=lambda j: -a[j].item())[:k]
        w = a[order]
        p = torch.exp(w - w.max()) / torch.exp(w - w.max()).sum()
        nbs = [e[bi, j] for j in order]
        s = []
        for j, nb in enumerate(nbs):
            r = (1 - p[j]) * h[bi, i] + p[j] * nb
            g = torch.tanh(h[bi, i] + r)
            s.append(nb.sum() * g.sum() if score == "published" else (nb * g).sum())
        s = torch.stack(s)
        att = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
        m[bi, i] = sum(att[j] * nbs[j] for j in range(k))
    return m


@pytest.mark.parametrize("score", ["published", "dot"])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_gcr_aggregate_matches_loops(score, k):
    h, e = torch.randn(2, 3, 4, dtype=f64), torch.randn(2, 9, 4, dtype=f64)
    torch.testing.assert_close(R.gcr_aggregate(h, e, k, score), _gcr_loops(h, e, k, score), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", ["published", "dot"])
def test_gcr_aggregate_gradcheck(score):
    h = torch.randn(1, 2, 3, dtype=f64, requires_grad=True)
    e = torch.randn(1, 6, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: R.gcr_aggregate(a, b, 3, score), (h, e))


# ------------------------------------------------------------------ class_patch_attention
def _explicit_attention(q, k):
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)  # B x heads x T x T


@pytest.mark.parametrize("num_prefix", [0, 2])
def test_class_patch_attention_matches_full_attention(num_prefix):
    q, k = torch.randn(2, 3, num_prefix + 4 + 7, 8, dtype=f64), torch.randn(2, 3, num_prefix + 4 + 7, 8, dtype=f64)
    full = _explicit_attention(q, k)
    first = num_prefix + 4
    expected = full[:, :, num_prefix:first, first:].mean(1)
    torch.testing.assert_close(R.class_patch_attention(q, k, num_prefix, 4, "mean_softmax"), expected)
    logits = (q @ k.transpose(-1, -2))[:, :, num_prefix:first, first:].sum(1)
    torch.testing.assert_close(R.class_patch_attention(q, k, num_prefix, 4, "sum_logits"), logits)


# ------------------------------------------------------------------ par_refine
def _par_conv(image, masks, dilations, num_iter):
    """PAR as the published module computes it: replicate pad + one-hot 3x3 dilated convs."""
    weight = torch.zeros(8, 1, 3, 3, dtype=image.dtype)
    for o, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        weight[o, 0, r, c] = 1

    def neighbours(x):
        b, c, h, w = x.shape
        out = []
        for d in dilations:
            pad = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(pad, weight, dilation=d).reshape(b, c, 8, h, w))
        return torch.cat(out, 2)

    nb = neighbours(image)
    aff = -((nb - image[:, :, None]).abs() / (nb.std(2, keepdim=True) + 1e-8) / 0.3) ** 2
    aff = aff.mean(1, keepdim=True).softmax(2)
    ker = torch.ones(8, dtype=image.dtype)
    ker[[0, 2, 5, 7]] = math.sqrt(2)
    pos = torch.cat([ker * d for d in dilations])
    pos_aff = (-(pos / (pos.std() + 1e-8) / 0.3) ** 2).softmax(0)
    aff = aff + 0.01 * pos_aff[None, None, :, None, None]
    for _ in range(num_iter):
        masks = (neighbours(masks) * aff).sum(2)
    return masks


@pytest.mark.parametrize("dilations", [(1, 2, 4, 8, 12, 24), (1, 3), (40,)])
def test_par_refine_matches_conv_formulation(dilations):
    image = torch.rand(2, 3, 13, 17, dtype=f64) * 255
    masks = torch.rand(2, 4, 13, 17, dtype=f64).softmax(1)
    out = R.par_refine(image, masks, list(dilations), 3, "fp32")
    torch.testing.assert_close(out, _par_conv(image, masks, dilations, 3), rtol=1e-10, atol=1e-12)


def test_par_refine_constant_image_scales_by_affinity_mass():
    image = torch.full((1, 3, 9, 9), 100.0, dtype=f64)
    masks = torch.full((1, 2, 9, 9), 0.5, dtype=f64)
    out = R.par_refine(image, masks, [1, 2], 4, "fp32")
    torch.testing.assert_close(out, masks * 1.01**4)


def test_par_refine_channels_are_independent():
    image = torch.rand(1, 3, 10, 11, dtype=f64) * 255
    a, b = torch.rand(1, 2, 10, 11, dtype=f64), torch.rand(1, 3, 10, 11, dtype=f64)
    both = R.par_refine(image, torch.cat([a, b], 1), [1, 2, 4], 5, "fp32")
    torch.testing.assert_close(both, torch.cat([R.par_refine(image, a, [1, 2, 4], 5, "fp32"), R.par_refine(image, b, [1, 2, 4], 5, "fp32")], 1))


# ------------------------------------------------------------------ dense_energy_loss
def _energy_brute(image, probs, gate, srgb, sxy):
    b, c, h, w = probs.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=f64), torch.arange(w, dtype=f64), indexing="ij")
    xy = torch.stack([rows, cols], -1).reshape(-1, 2)
    total, as_all = 0.0, []
    for bi in range(b):
        rgb = image[bi].reshape(3, -1).t()
        d2 = torch.cdist(xy, xy) ** 2 / (2 * sxy**2) + torch.cdist(rgb, rgb) ** 2 / (2 * srgb**2)
        wmat = torch.exp(-d2)  # HW x HW, p = q included
        s = probs[bi].reshape(c, -1)
        as_ = gate[bi].reshape(1, -1) * (s @ wmat.t())
        total -= (s * as_).sum().item()
        as_all.append(as_.reshape(c, h, w))
    return total / b, torch.stack(as_all)


def test_dense_energy_matches_brute_force_with_published_gradient():
    image = torch.rand(2, 3, 5, 6, dtype=f64) * 255
    probs = torch.rand(2, 3, 5, 6, dtype=f64).softmax(1).requires_grad_()
    gate = torch.rand(2, 5, 6, dtype=f64)
    gate[0, 0, :3] = 0
    e = R.dense_energy_loss(image, probs, gate, 15.0, 3.0)
    value, as_ = _energy_brute(image, probs.detach(), gate, 15.0, 3.0)
    assert e.item() == pytest.approx(value, rel=1e-10)
    e.backward()
    torch.testing.assert_close(probs.grad, -2 * as_ / 2)


def test_gaussian_filter_chunks_agree():
    image = torch.rand(1, 3, 40, 30, dtype=f64) * 255  # 1200 pixels: several chunks of the filter
    v = torch.rand(1, 2, 40, 30, dtype=f64)
    out = R.gaussian_filter(image, v, 15.0, 50.0)
    _, as_ = _energy_brute(image, v, torch.ones(1, 40, 30, dtype=f64), 15.0, 50.0)
    torch.testing.assert_close(out, as_)


# ------------------------------------------------------------------ validation and dispatch
# bad input on both backends: tests/test_bad_input.py (messages anchored to the argument's name)


def test_backend_is_read_at_each_call():
    with kernels.use_backend("reference"):
        assert kernels.resolve_backend("affinity_loss", torch.device("cpu")) == "reference"
    with kernels.use_backend("triton"):
        assert kernels.resolve_backend("affinity_loss", torch.device("cuda")) == "triton"


def test_reference_backend_matches_reference_module(monkeypatch):
    force_backend(monkeypatch, "reference")
    t, lab = torch.randn(2, 9, 4), torch.randint(0, 3, (2, 9))
    assert torch.equal(kernels.affinity_loss(t, lab), R.affinity_loss(t, lab, 255))
