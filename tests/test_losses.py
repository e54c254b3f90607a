"""Losses and maps/labels (docs/METHOD.md: Losses, Maps and labels): hand cases, gradchecks, vectorization vs loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from more_fast import cam as C
from more_fast import losses as L
from more_fast.model import MoReNet

f64 = torch.float64


def test_mct_loss_orthogonal_tokens_hand_value():
    q = torch.eye(3)[None] * 5  # orthonormal after l2norm: sim = I / t
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 2))
    assert L.mct_loss(q, temperature=0.5).item() == pytest.approx(expected, rel=1e-5)
    assert L.mct_loss(q).item() < 1e-5  # at t = 0.07 orthogonal tokens are nearly a perfect fit


def test_cam_labels_thresholds_and_restriction():
    cam = torch.tensor([[[[0.9, 0.6, 0.2]], [[0.95, 0.1, 0.1]]]])  # B=1, K=2, 1 x 3
    # class 1 absent: only class 0 counts. values 0.9 (> hi) -> 1; 0.6 (<= hi, > lo) -> 255; 0.2 -> 0
    lab = C.cam_labels(cam, torch.tensor([[1.0, 0.0]]), hi=0.7, lo=0.25)
    assert lab.tolist() == [[[1, 255, 0]]]
    lab = C.cam_labels(cam, torch.tensor([[1.0, 1.0]]), hi=0.7, lo=0.25)
    assert lab.tolist() == [[[2, 255, 0]]]


def _ure_candidates_loop(labels):
    b, h, w = labels.shape
    roi = L.ure_roi(labels)
    out = torch.zeros(b, h * w, dtype=torch.bool)
    for bi in range(b):
        for r in range(3, h - 2):
            for c in range(3, w - 2):
                window = roi[bi, r - 3: r + 3, c - 3: c + 3]
                if labels[bi, r, c] == 255 and window.mean() >= 1.2:
                    out[bi, r * w + c] = True
    return out


def test_ure_sample_picks_centred_window_candidates():
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (3, 10, 11))
    labels[labels == 2] = 255
    labels[:, 4:8, 4:8] = 1
    noise = torch.rand(3, 110)
    index, valid = L.ure_sample(labels, noise)
    cand = _ure_candidates_loop(labels)
    for bi in range(3):
        chosen = set(index[bi][valid[bi]].tolist())
        n = int(cand[bi].sum())
        if n >= 8:
            assert len(chosen) == 8 and all(cand[bi, i] for i in chosen)
        else:  # plus (8 - n) // 4 foreground patches whose window lies inside the grid
            inner = torch.zeros(10, 11, dtype=torch.bool)
            inner[3:8, 3:9] = True
            fg = ((labels[bi] != 0) & (labels[bi] != 255) & inner).flatten()
            assert int(fg.sum()) >= (8 - n) // 4  # this case never takes the fallback
            picked_cand = {i for i in chosen if cand[bi, i]}
            assert picked_cand == set(cand[bi].nonzero().flatten().tolist())
            extra = chosen - picked_cand
            assert len(extra) == (8 - n) // 4 and all(fg[i] for i in extra)


def test_ure_sample_few_candidates_adds_foreground():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, :] = 1  # all foreground, no uncertain patch: n = 0 -> (8 - 0) // 4 = 2 foreground
    index, valid = L.ure_sample(labels, torch.rand(1, 64))
    assert int(valid.sum()) == 2


def test_ure_loss_hand_value():
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two patches
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # class 0 along x, class 1 along y
    index = torch.tensor([[0, 1]])
    valid = torch.tensor([[True, False]])
    y = torch.tensor([[1.0, 0.0]])  # token 0 matches the present class 0 exactly
    expected = 0.5 * (1 - 1 / 2) + 0.5 * 0 / 2
    assert L.ure_loss(p, q, index, valid, y).item() == pytest.approx(expected)


def test_ure_loss_gradcheck():
    p = torch.randn(2, 6, 4, dtype=f64, requires_grad=True)
    q = torch.randn(2, 3, 4, dtype=f64)
    index = torch.tensor([[0, 3, 5], [1, 2, 2]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    fn = lambda x: L.ure_loss(x.double(), q, index, valid, y)  # noqa: E731
    # ure_loss computes in float32 by design; check the gradient numerically at float32 precision
    loss = fn(p)
    loss.backward()
    eps = 1e-3
    num = torch.zeros_like(p)
    for i in range(p.numel()):
        d = torch.zeros(p.numel(), dtype=f64)
        d[i] = eps
        d = d.view_as(p)
        num.view(-1)[i] = (fn(p.detach() + d) - fn(p.detach() - d)) / (2 * eps)
    torch.testing.assert_close(p.grad, num, rtol=1e-3, atol=1e-4)


def test_seg_loss_averages_background_and_foreground_separately():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    ce = F.cross_entropy(logits, labels.clamp(max=2), reduction="none")[0]
    expected = 0.5 * (ce[0, 0] + (ce[0, 1] + ce[1, 0]) / 2)
    assert L.seg_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(L.seg_loss(logits, torch.full((1, 2, 2), 255)))  # nothing labelled: 0, not NaN


def test_reg_loss_gate_and_value():
    image = torch.rand(1, 3, 8, 8) * 255
    seg = torch.randn(1, 3, 8, 8, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    loss = L.reg_loss(image, seg, labels, 0.5, 15.0, 100.0)
    loss.backward()
    assert loss.item() < 0 and seg.grad.abs().sum() > 0


def test_minmax_and_map_prediction():
    cam = torch.rand(2, 3, 5, 5) * 4 - 1
    n = C.minmax_normalize(cam)
    assert n.amin((-2, -1)).abs().max() < 1e-6 and (n.amax((-2, -1)) - 1).abs().max() < 1e-5
    pred = C.map_prediction(n, torch.tensor([[1.0, 0, 0], [0, 0, 1]]), 0.45)
    assert set(pred[0].unique().tolist()) <= {0, 1} and set(pred[1].unique().tolist()) <= {0, 3}


def test_par_pseudo_labels_only_present_classes_and_uncertain_band():
    torch.manual_seed(0)
    image = torch.full((2, 3, 32, 32), 40.0) + torch.rand(2, 3, 32, 32) * 5
    image[:, :, 8:24, 8:24] += 150  # the object stands out, so PAR keeps it apart from the background
    cam = torch.zeros(2, 4, 32, 32)
    cam[:, 1, 8:24, 8:24] = 1.0
    cam[:, 1, 6:8, 8:24] = 0.5  # a mid-confidence band
    cam[:, 2] = 0.9  # class 2 everywhere, but absent from the labels
    cls = torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0]])
    lab = C.par_pseudo_labels(image, cam, cls, 0.7, 0.25, "fp32")
    assert lab.shape == (2, 32, 32)
    assert set(lab.unique().tolist()) <= {0, 2, 255}
    assert (lab[:, 12:20, 12:20] == 2).all() and (lab[:, 28:, :] == 0).all()


def test_multiscale_reuse_equals_full_pass():
    torch.manual_seed(0)
    model = MoReNet("vit_tiny_patch16_224", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        reuse = model.cams(out) + (C.lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid),)
    a = C.multiscale_maps(model, x, (1.0, 0.5), reuse=reuse, with_lam=True)
    b = C.multiscale_maps(model, x, (1.0, 0.5), with_lam=True)
    for name in ("cam", "aux_cam", "lam"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
        assert a[name].shape == (2, 3, 64, 64) and a[name].min() >= 0 and a[name].max() < 1
