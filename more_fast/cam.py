"""Maps and labels: multi-scale CAM (docs/METHOD.md, Maps and labels)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import kernels

from .data.palette import IGNORE_INDEX as IGNORE
from .model.network import MoReNet


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def minmax_normalize(cam: torch.Tensor) -> torch.Tensor:
    """Per image and class: subtract the min, divide by (max + 1e-5). B x K x H x W."""
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def lam_from_tokens(patch_tokens: torch.Tensor, class_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LAM_c = P . Q_c over the grid: B x K x h x w (no ReLU, no normalization of the operands)."""
    lam = class_tokens.float() @ patch_tokens.float().transpose(1, 2)  # B x K x N
    return lam.reshape(lam.shape[0], lam.shape[1], *grid)


@torch.no_grad()
def multiscale_maps(model: MoReNet, images: torch.Tensor, scales: Sequence[float],
                    reuse: Optional[tuple[torch.Tensor, ...]] = None, with_lam: bool = False,
                    backbone=None) -> dict[str, torch.Tensor]:
    """Multi-scale + flip CAM and aux CAM (docs/METHOD.md, Multi-scale CAM), and optionally the LAM, at the input size.

    For every scale: resize the batch, run the backbone on [x, flip(x)], compute the maps, resize
    to the input size, take the max of a map and its flipped-back twin (ReLU for the CAM and aux
    CAM only: the published multi_scale_lam2 keeps the LAM's negative values, and the min-max
    below then maps its minimum, not 0, to 0); sum over scales; min-max normalize per image and
    class. `reuse` = (CAM, aux CAM[, LAM]) of the unflipped scale-1.0 pass (B x K x h x w on the
    grid, from the training forward): that pass is then not run again, only its flipped twin.
    `backbone` overrides model.forward_features (a compiled one).
    Returns {"cam", "aux_cam"[, "lam"]}, each B x K x H x W float32 in [0, 1).
    """
    features = backbone if backbone is not None else model.forward_features
    b, _, height, width = images.shape
    totals: dict[str, torch.Tensor] = {}
    for scale in scales:
        if scale == 1.0:
            x = images
        else:  # int(s * side) as published, rounded to whole patches (equal at the 448 crop)
            patch = model.encoder.patch_size
            x = _resize(images, [max(patch, round(int(scale * side) / patch) * patch) for side in (height, width)])
        reuse_here = reuse is not None and scale == 1.0
        batch = x.flip(-1) if reuse_here else torch.cat([x, x.flip(-1)], dim=0)  # (1 or 2)B x 3 x h x w
        feats = features(batch)
        cam, aux = model.cams(feats)
        maps = {"cam": cam, "aux_cam": aux}
        if with_lam:
            q = model.graph_layer(feats.class_tokens, feats.patch_tokens)
            maps["lam"] = lam_from_tokens(feats.patch_tokens, q, feats.grid)
        for name, m in maps.items():
            m = _resize(m.float(), (height, width))
            if reuse_here:
                index = ("cam", "aux_cam", "lam").index(name)
                plain, flipped = _resize(reuse[index].detach().float(), (height, width)), m
            else:
                plain, flipped = m[:b], m[b:]
            m = torch.maximum(plain, flipped.flip(-1))
            if name != "lam":
                m = F.relu(m)
            totals[name] = totals[name] + m if name in totals else m
    return {name: minmax_normalize(m) for name, m in totals.items()}


def cam_labels(cam: torch.Tensor, cls_labels: torch.Tensor, hi: float, lo: float) -> torch.Tensor:
    """labels(cam, hi, lo) (docs/METHOD.md, CAM labels): restrict to present classes, max over classes;
    label = argmax + 1, 255 where the max <= hi, 0 where the max <= lo. B x K x h x w -> B x h x w."""
    valid = cam * cls_labels[:, :, None, None].to(cam.dtype)
    value, index = valid.max(dim=1)
    label = index + 1
    label = torch.where(value <= hi, torch.full_like(label, IGNORE), label)
    return torch.where(value <= lo, torch.zeros_like(label), label)


def resize_to_grid(cam: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return _resize(cam, grid)


def par_pseudo_labels(image: torch.Tensor, cam: torch.Tensor, cls_labels: torch.Tensor,
                      hi: float, lo: float, affinity_storage: str) -> torch.Tensor:
    """PAR-refined pseudo labels for L_seg (docs/METHOD.md, PAR pseudo labels), batched.

    image B x 3 x H x W (0..255), cam B x K x H x W in [0, 1], cls_labels B x K; hi, lo the two
    background scores; affinity_storage the PAR op's ("fp32" | "bf16").
    At half resolution: [background = hi | CAM of the present classes] softmaxed over the present
    channels (absent ones get 0), the same with background = lo; both sets are refined in one
    PAR call (concatenated along channels, sharing the image affinity); upsampled, argmax.
    Result: the hi labels, with background turned to 255 unless the lo labels also say
    background. B x H x W int64 (0 background, c+1 class c, 255 uncertain).
    """
    b, k, height, width = cam.shape
    half = (height // 2, width // 2)
    small_image = _resize(image.float(), half)
    small_cam = _resize((cam * cls_labels[:, :, None, None].to(cam.dtype)).float(), half)  # B x K x h x w
    present = torch.cat([torch.ones_like(cls_labels[:, :1]), cls_labels], dim=1).bool()  # B x (K+1)
    absent = ~present[:, :, None, None]
    sets = []
    for bkg in (hi, lo):
        x = torch.cat([torch.full_like(small_cam[:, :1], bkg), small_cam], dim=1)  # B x (K+1) x h x w
        sets.append(x.masked_fill(absent, float("-inf")).softmax(dim=1))
    # the published dilations and iterations: the op's defaults
    refined = kernels.par_refine(small_image, torch.cat(sets, dim=1), affinity_storage=affinity_storage)
    refined = _resize(refined.float(), (height, width)).reshape(b, 2, k + 1, height, width)
    refined = refined.masked_fill(absent[:, None], -1.0)
    label_hi, label_lo = refined.argmax(dim=2).unbind(1)  # B x H x W each
    label = torch.where(label_hi == 0, torch.full_like(label_hi, IGNORE), label_hi)
    return torch.where((label_hi + label_lo) == 0, torch.zeros_like(label), label)


def seg_prediction(seg_logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Decoder logits on the grid -> B x H x W label map at `size`."""
    return _resize(seg_logits.float(), size).argmax(dim=1)


def map_prediction(maps: torch.Tensor, cls_labels: torch.Tensor, bkg: float) -> torch.Tensor:
    """Label map from normalized maps (CAM/LAM, B x K x H x W) with image labels and a constant
    background score: argmax over [bkg | maps of the present classes]."""
    valid = maps * cls_labels[:, :, None, None].to(maps.dtype)
    scores = torch.cat([torch.full_like(valid[:, :1], bkg), valid], dim=1)
    return scores.argmax(dim=1)
