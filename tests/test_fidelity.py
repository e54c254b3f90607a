"""Fidelity to the published code: evaluation protocols, initialization, augmentation, recipes.

Each test holds a case where the previous behaviour differs from the published one (a LAM with
negative values, a decoder case where averaging probabilities and max-of-summed-logits disagree,
an all-zero classifier output, ...), so it fails on that behaviour.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from more_fast import cam as C
from more_fast.model import MoReNet


def _tiny(num_classes=3, **kw):
    return MoReNet("vit_tiny_patch16_224", num_classes=num_classes, depth=2, decoder_dim=16, **kw).eval()


# ----------------------------------------------------------------------------- 1. LAM without ReLU
def _published_lam(model, x, scales):
    """The published multi_scale_lam2, written out: per scale the LAM of [x, flip x], resized to the
    input, elementwise max with the flipped-back twin (no ReLU); sum; per image and class min-max."""
    b, _, h, w = x.shape
    total, raw_min = 0, math.inf
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        feats = model.forward_features(torch.cat([xs, xs.flip(-1)]))
        q = model.graph_layer(feats.class_tokens, feats.patch_tokens)
        lam = torch.einsum("bnd,bkd->bkn", feats.patch_tokens, q).reshape(2 * b, -1, *feats.grid)
        lam = F.interpolate(lam, size=(h, w), mode="bilinear", align_corners=False)
        lam = torch.maximum(lam[:b], lam[b:].flip(-1))
        raw_min = min(raw_min, float(lam.min()))
        total = total + lam
    total = total - total.amin((-2, -1), keepdim=True)
    return total / (total.amax((-2, -1), keepdim=True) + 1e-5), raw_min


@pytest.mark.parametrize("reuse", [False, True])
def test_multiscale_lam_keeps_negative_values(reuse):
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    scales = (1.0, 0.5, 1.5)
    with torch.no_grad():
        expected, raw_min = _published_lam(model, x, scales)
        out = model(x)
        again = model.cams(out) + (C.lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid),)
    assert raw_min < -0.1  # the case where a ReLU changes the map
    maps = C.multiscale_maps(model, x, scales, with_lam=True, reuse=again if reuse else None)
    torch.testing.assert_close(maps["lam"], expected, rtol=0, atol=2e-5)
    # the CAM keeps its ReLU: with a ReLU'd sum the per-class min is >= 0 before normalization
    relu_cam = 0
    with torch.no_grad():
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(int(s * 64),) * 2, mode="bilinear", align_corners=False)
            cam = model.cams(model.forward_features(torch.cat([xs, xs.flip(-1)])))[0]
            cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
            relu_cam = relu_cam + F.relu(torch.maximum(cam[:2], cam[2:].flip(-1)))
    torch.testing.assert_close(maps["cam"], C.minmax_normalize(relu_cam), rtol=0, atol=2e-5)
