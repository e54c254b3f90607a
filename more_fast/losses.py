"""The MoRe losses (docs/METHOD.md, Losses). The pairwise and contrast losses go through the fused ops in `kernels`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

import kernels

from .data.palette import IGNORE_INDEX as IGNORE

if TYPE_CHECKING:
    from .model.network import MoReOutput


# The published L_reg filters with the rloss permutohedral lattice (a CPU extension), whose output
# is 0.57-0.60 of the exact Gaussian sum on images at the recipe's sigmas (sigma_rgb 15, sigma_xy
# 50 at half resolution), measured against the extension built from its source; the gradient
# directions agree (cosine >= 0.997). We filter exactly and multiply by this gain, so L_reg has
# the published effective weight. It holds for those sigmas only (about 0.48-0.54 at sigma_xy 5).
LATTICE_GAIN = 0.58


def cls_loss(logits: torch.Tensor, cls_labels: torch.Tensor) -> torch.Tensor:
    """L_cls / L_aux: multilabel soft margin on B x K logits."""
    return F.multilabel_soft_margin_loss(logits.float(), cls_labels.float())


def mct_loss(class_tokens: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """L_mct: cross entropy of Qn Qn^T / 0.07 (B x K x K) against the identity."""
    qn = F.normalize(class_tokens.float(), dim=-1)  # B x K x D
    b, k, _ = qn.shape
    sim = qn @ qn.transpose(1, 2) / temperature  # B x K x K
    target = torch.arange(k, device=qn.device).repeat(b)  # row c's target is c
    return F.cross_entropy(sim.reshape(b * k, k), target)


def ptc_loss(patch_tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ptc: CAM-affinity consistency of the final patch tokens (B x N x D) with labels (B x N)."""
    return kernels.affinity_loss(patch_tokens, labels, IGNORE)


def cre_loss(class_tokens: torch.Tensor, patch_tokens: torch.Tensor, labels: torch.Tensor,
             cls_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_cre (LIR class-to-patch contrast); patch tokens get no gradient."""
    return kernels.lir_loss(class_tokens, patch_tokens, labels, cls_labels, temperature)


def ure_roi(labels: torch.Tensor) -> torch.Tensor:
    """0 background, 1 uncertain (255), 2 foreground: B x h x w float."""
    return torch.where(labels == IGNORE, 1.0, torch.where(labels == 0, 0.0, 2.0))


def ure_sample(labels: torch.Tensor, noise: torch.Tensor, num_samples: int = 8, window: int = 6,
               threshold: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the uncertain-region tokens of L_ure, vectorized over the batch.

    labels B x h x w (0 / class+1 / 255); noise B x (h*w) uniform [0, 1) from a seeded
    generator (drawn by the caller, outside any compiled region). Candidates: uncertain
    patches whose window (rows r-3..r+2, cols c-3..c+2, fully inside the grid) has mean roi
    >= threshold. More than `num_samples` candidates: `num_samples` of them at random. Otherwise
    all n candidates plus (num_samples - n) // 4 random foreground patches with a window inside
    the grid, or, when fewer such foreground patches exist than that, random patches with a
    window inside the grid (the published fallback).
    Returns (index B x S into the h*w patches, valid B x S bool), S = min(num_samples, h*w).
    """
    b, h, w = labels.shape
    roi = ure_roi(labels)[:, None]  # B x 1 x h x w
    cand = torch.zeros(b, h, w, dtype=torch.bool, device=labels.device)
    inner = torch.zeros_like(cand)  # the patches whose window lies inside the grid
    if h >= window and w >= window:
        mean = F.avg_pool2d(roi, window, stride=1)[:, 0]  # B x (h-5) x (w-5); (i, j) is centred at (i+3, j+3)
        half = window // 2
        cand[:, half: half + h - window + 1, half: half + w - window + 1] = mean >= threshold
        inner[:, half: half + h - window + 1, half: half + w - window + 1] = True
    cand = (cand & (labels == IGNORE)).flatten(1)  # B x N
    inner = inner.flatten(1)
    fg = ((labels != 0) & (labels != IGNORE)).flatten(1) & inner
    s = min(num_samples, h * w)
    n_cand = cand.sum(1)
    need = torch.where(n_cand < s, (s - n_cand) // 4, torch.zeros_like(n_cand))
    pool = torch.where((fg.sum(1) >= need)[:, None], fg, inner & ~cand)  # the published fallback
    # candidates rank above the pool, which ranks above everything else
    key = torch.where(cand, 2.0 + noise, torch.where(pool, noise, torch.full_like(noise, -1.0)))
    index = key.topk(s, dim=1).indices  # B x S
    n_sel = n_cand.clamp(max=s) + torch.minimum(pool.sum(1), need)
    valid = torch.arange(s, device=labels.device)[None] < n_sel[:, None]
    return index, valid


def ure_loss(patch_tokens: torch.Tensor, class_tokens: torch.Tensor, index: torch.Tensor,
             valid: torch.Tensor, cls_labels: torch.Tensor) -> torch.Tensor:
    """L_ure: mean over sampled tokens u of
    0.5 (1 - sum_c y_c s_c / (sum y + 1)) + 0.5 sum_c (1 - y_c) s_c / (sum (1 - y) + 1),
    s_c = |<l2norm(u), l2norm(Q_c)>|, Q detached."""
    pn = F.normalize(patch_tokens.float(), dim=-1)  # B x N x D
    qn = F.normalize(class_tokens.detach().float(), dim=-1)  # B x K x D
    u = torch.gather(pn, 1, index[..., None].expand(-1, -1, pn.shape[-1]))  # B x S x D
    s = (u @ qn.transpose(1, 2)).abs()  # B x S x K
    y = cls_labels.float()[:, None, :]  # B x 1 x K
    pos = (y * s).sum(-1) / (y.sum(-1) + 1)
    neg = ((1 - y) * s).sum(-1) / ((1 - y).sum(-1) + 1)
    per_token = 0.5 * (1 - pos) + 0.5 * neg  # B x S
    v = valid.float()
    return (per_token * v).sum() / v.sum().clamp_min(1)


def seg_loss(seg_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_seg: cross entropy averaged over background and over foreground pixels separately,
    then the two averaged (an empty part counts 0 instead of the published NaN).
    seg_logits B x (K+1) x H x W at label resolution, labels B x H x W."""
    ce = F.cross_entropy(seg_logits.float(), labels.long().clamp(max=seg_logits.shape[1] - 1), reduction="none")
    bg = (labels == 0).float()
    fg = ((labels != 0) & (labels != IGNORE)).float()
    bg_loss = (ce * bg).sum() / bg.sum().clamp_min(1)
    fg_loss = (ce * fg).sum() / fg.sum().clamp_min(1)
    return 0.5 * (bg_loss + fg_loss)


def reg_loss(image: torch.Tensor, seg_logits: torch.Tensor, labels: torch.Tensor, scale: float, sigma_rgb: float,
             sigma_xy: float, weight: float = 1e-7, gain: float = LATTICE_GAIN) -> torch.Tensor:
    """L_reg = weight * LATTICE_GAIN * E (dense CRF energy, exact Gaussian; the gain gives it the
    published lattice's effective weight): image B x 3 x H x W in 0..255, seg_logits
    B x (K+1) x H x W at the crop resolution, labels B x H x W pseudo labels (255 = uncertain).
    E is taken at `scale` of the crop, sigma_xy in pixels of the full crop (the op gets scale * it)."""
    h, w = int(image.shape[-2] * scale), int(image.shape[-1] * scale)
    img = F.interpolate(image.float(), size=(h, w), mode="nearest")
    probs = F.interpolate(seg_logits.float().softmax(1), size=(h, w), mode="bilinear", align_corners=False)
    lab = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    gate = torch.where(lab == IGNORE, torch.ones_like(lab), (1 - probs.detach().amax(1)).clamp_min(0))
    return weight * gain * kernels.dense_energy_loss(img, probs, gate, sigma_rgb, sigma_xy * scale)


def compute_losses(out: "MoReOutput", cls_labels: torch.Tensor, ptc_labels: torch.Tensor,
                   cre_labels: torch.Tensor, ure_index: torch.Tensor, ure_valid: torch.Tensor,
                   seg_labels: Optional[torch.Tensor], image: torch.Tensor, weights: dict[str, float],
                   cre_temperature: float, reg_scale: float, reg_sigma_rgb: float,
                   reg_sigma_xy: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total of the active terms (`weights`, training.loop.loss_weights) and each term.
    Labels on the grid are B x N (seg: B x H x W); the floats are the recipe's (TrainConfig)."""
    terms = {
        "cls": cls_loss(out.logits, cls_labels),
        "aux": cls_loss(out.aux_logits, cls_labels),
        "mct": mct_loss(out.class_tokens),
    }
    if "ptc" in weights:
        terms["ptc"] = ptc_loss(out.patch_tokens, ptc_labels)
    if "cre" in weights:
        terms["cre"] = cre_loss(out.class_tokens, out.patch_tokens, cre_labels, cls_labels, cre_temperature)
    if "ure" in weights:
        terms["ure"] = ure_loss(out.patch_tokens, out.class_tokens, ure_index, ure_valid, cls_labels)
    if "seg" in weights or "reg" in weights:
        seg = F.interpolate(out.seg.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
        if "seg" in weights:
            terms["seg"] = seg_loss(seg, seg_labels)
        if "reg" in weights:
            terms["reg"] = reg_loss(image, seg, seg_labels, reg_scale, reg_sigma_rgb, reg_sigma_xy)
    total = sum(weights[name] * value.float() for name, value in terms.items())
    return total, terms
