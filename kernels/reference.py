"""Plain PyTorch of every fused op: the oracle for tests and benchmarks.

Written for clarity, not speed (docs/METHOD.md gives the math). Nothing here checks its inputs
or supplies a default: the public ops (kernels/__init__.py) check them once and pass every
argument, for this backend and the Triton one alike. Each function computes in float32 (float64
when given float64, which is how the tests build their oracle), and returns losses in that
compute dtype. Gradients come from autograd, except `dense_energy_loss`, whose gradient is the
published extension's choice (docs/METHOD.md, Losses).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "affinity_loss",
    "lir_loss",
    "gcr_aggregate",
    "class_patch_attention",
    "par_refine",
    "dense_energy_loss",
    "par_offsets",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# L_ptc: CAM-affinity consistency (docs/METHOD.md, Losses)
# --------------------------------------------------------------------------------------------
def affinity_loss(tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0.5 (1 - S_pos / (n_pos + 1)) + 0.5 S_neg / (n_neg + 1) over pairs i != j of one image.

    c_ij = |cos(tokens_i, tokens_j)|; a pair counts when both labels differ from ignore_index;
    it is positive when the labels agree. Sums and counts run over all images together.
    """
    x = F.normalize(tokens.to(_compute_dtype(tokens)), dim=-1, eps=1e-8)  # B x N x D
    cos = (x @ x.transpose(1, 2)).abs()  # B x N x N
    lab = labels.long()
    valid = lab != ignore_index  # B x N
    n = lab.shape[1]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=lab.device)
    pair = valid[:, :, None] & valid[:, None, :] & off_diag  # B x N x N
    same = lab[:, :, None] == lab[:, None, :]
    pos = pair & same
    neg = pair & ~same
    s_pos = (cos * pos).sum()
    s_neg = (cos * neg).sum()
    return 0.5 * (1 - s_pos / (pos.sum() + 1)) + 0.5 * s_neg / (neg.sum() + 1)


# --------------------------------------------------------------------------------------------
# L_cre: LIR class-to-patch contrast (docs/METHOD.md, Losses)
# --------------------------------------------------------------------------------------------
def lir_loss(
    cls_tokens: torch.Tensor,
    patch_tokens: torch.Tensor,
    labels: torch.Tensor,
    cls_labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """(1/B) sum over images b and present classes c of mean_{n: labels_n = c+1} -log softmax_n(z_c)_n.

    z_cn = <l2norm(cls_tokens_c), patch_tokens_n> / temperature, patch tokens detached and not
    normalized. A class with no patch of its label contributes 0. Computed as a log-softmax so
    that large logits do not overflow.
    """
    ct = _compute_dtype(cls_tokens)
    q = F.normalize(cls_tokens.to(ct), dim=-1)  # B x K x D
    p = patch_tokens.detach().to(ct)  # B x N x D
    z = (q @ p.transpose(1, 2)) / temperature  # B x K x N
    logp = z.log_softmax(dim=-1)
    num_cls = cls_tokens.shape[1]
    class_ids = torch.arange(1, num_cls + 1, device=labels.device)
    member = labels.long()[:, None, :] == class_ids[None, :, None]  # B x K x N
    count = member.sum(-1)  # B x K
    nll = -(logp * member).sum(-1) / count.clamp_min(1)  # B x K
    present = cls_labels != 0
    return (nll * present).sum() / cls_tokens.shape[0]


# --------------------------------------------------------------------------------------------
# GCR aggregation, docs/METHOD.md, GCR
# --------------------------------------------------------------------------------------------
def gcr_aggregate(h: torch.Tensor, e: torch.Tensor, k: int, score: str) -> torch.Tensor:
    """M_i = sum_j a_ij Nb_ij over the top-k nodes of A = h e^T / sqrt(D).

    p = softmax(top-k values); R = (1 - p) h_i + p Nb; g = tanh(h_i + R);
    s = sum_d(Nb) * sum_d(g) ("published") or <Nb, g> ("dot"); a = softmax(s).
    Returns M (B x K x D) in h's dtype.
    """
    ct = _compute_dtype(h)
    hh, ee = h.to(ct), e.to(ct)
    b, _, d = hh.shape
    a_logits = hh @ ee.transpose(1, 2) / math.sqrt(d)  # B x K x L
    w, idx = a_logits.topk(k, dim=-1)  # B x K x k
    batch = torch.arange(b, device=h.device)[:, None, None]
    nb = ee[batch, idx]  # B x K x k x D
    p = w.softmax(dim=-1)[..., None]  # B x K x k x 1
    hi = hh[:, :, None, :]  # B x K x 1 x D
    r = (1 - p) * hi + p * nb
    g = torch.tanh(hi + r)
    if score == "published":
        s = nb.sum(-1) * g.sum(-1)  # B x K x k
    else:
        s = (nb * g).sum(-1)
    a = s.softmax(dim=-1)
    m = (a[..., None] * nb).sum(2)  # B x K x D
    return m.to(h.dtype)


# --------------------------------------------------------------------------------------------
# Class-patch attention (docs/METHOD.md, Class-patch attention)
# --------------------------------------------------------------------------------------------
def class_patch_attention(
    q: torch.Tensor, k: torch.Tensor, num_prefix: int, num_cls: int, reduce: str
) -> torch.Tensor:
    """Attention of the class-token queries over the patch keys, reduced over heads: B x K x N.

    Class tokens are rows num_prefix .. num_prefix + num_cls - 1; patches are the keys after
    them. "mean_softmax": mean over heads of softmax(q k^T / sqrt(d)) normalized over all T
    keys; "sum_logits": sum over heads of the raw q.k (no scale), the published score map.
    """
    ct = _compute_dtype(q)
    first_patch = num_prefix + num_cls
    qc = q[:, :, num_prefix:first_patch].to(ct)  # B x heads x K x d
    logits = qc @ k.to(ct).transpose(-1, -2)  # B x heads x K x T
    if reduce == "mean_softmax":
        probs = (logits * q.shape[-1] ** -0.5).softmax(dim=-1)
        return probs[..., first_patch:].mean(dim=1)
    return logits[..., first_patch:].sum(dim=1)


# --------------------------------------------------------------------------------------------
# PAR refinement (docs/METHOD.md, PAR pseudo labels)
# --------------------------------------------------------------------------------------------
_BASE_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
PAR_W1 = 0.3  # temperature of both affinities
PAR_W2 = 0.01  # weight of the spatial affinity


def par_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 neighbours at each dilation, in the published order (row-major around the centre)."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _BASE_OFFSETS]


def _neighbours(x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """B x C x H x W -> B x C x J x H x W, replicate padding (coordinates clamped)."""
    height, width = x.shape[-2:]
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    out = []
    for dy, dx in offsets:
        r = (rows + dy).clamp(0, height - 1)
        c = (cols + dx).clamp(0, width - 1)
        out.append(x.index_select(-2, r).index_select(-1, c))
    return torch.stack(out, dim=2)


def par_spatial_affinity(dilations: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
    """0.01 * softmax over the J neighbours of -(dist / (std(dist) + 1e-8) / 0.3)^2: shape J."""
    dist = torch.tensor(
        [math.hypot(dy, dx) if dy and dx else float(abs(dy) + abs(dx)) for dy, dx in par_offsets(dilations)],
        dtype=torch.float64,
    )
    aff = -((dist / (dist.std() + 1e-8) / PAR_W1) ** 2)
    return (PAR_W2 * aff.softmax(0)).to(dtype=dtype, device=device)


def par_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The per-pixel neighbour weights of PAR: B x J x H x W (sum over J is 1.01)."""
    img = image.to(_compute_dtype(image))
    nb = _neighbours(img, par_offsets(dilations))  # B x 3 x J x H x W
    diff = (nb - img[:, :, None]).abs()
    std = nb.std(dim=2, keepdim=True)  # unbiased, over the J neighbours, per channel
    aff = -((diff / (std + 1e-8) / PAR_W1) ** 2)
    aff = aff.mean(dim=1).softmax(dim=1)  # B x J x H x W
    pos = par_spatial_affinity(dilations, img.dtype, img.device)
    return aff + pos[None, :, None, None]


def par_refine(
    image: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int], num_iter: int, affinity_storage: str
) -> torch.Tensor:
    """num_iter rounds of mask <- sum_j affinity_j * mask at neighbour j (docs/METHOD.md, PAR pseudo labels). B x C x H x W.

    Channels are refined independently, so several mask sets for the same image (the two
    background thresholds) can be concatenated along C and refined in one call.
    affinity_storage "bf16": the weights rounded to bf16 (nearest even) before the iterations, as
    the Triton path stores them to halve their bytes; "fp32": the published refinement.
    """
    aff = par_affinity(image, dilations)  # B x J x H x W
    if affinity_storage == "bf16":
        aff = aff.to(torch.bfloat16).to(aff.dtype)
    height, width = masks.shape[-2:]
    m = masks.to(_compute_dtype(image))
    for _ in range(num_iter):
        acc = torch.zeros_like(m)
        j = 0
        for d in dilations:  # replicate padding once per dilation; the 8 neighbours are views of it
            padded = F.pad(m, [d, d, d, d], mode="replicate")
            for dy, dx in _BASE_OFFSETS:
                shifted = padded[..., d + dy * d: d + dy * d + height, d + dx * d: d + dx * d + width]
                acc += aff[:, j: j + 1] * shifted
                j += 1
        m = acc
    return m


# --------------------------------------------------------------------------------------------
# L_reg: dense CRF energy with the exact Gaussian (docs/METHOD.md, Losses)
# --------------------------------------------------------------------------------------------
def _pixel_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """B x 3 x H x W -> B x HW x 5: (row / sigma_xy, col / sigma_xy, rgb / sigma_rgb)."""
    b, _, height, width = image.shape
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=image.dtype, device=image.device),
        torch.arange(width, dtype=image.dtype, device=image.device),
        indexing="ij",
    )
    xy = torch.stack([rows, cols], dim=0).expand(b, 2, height, width) / sigma_xy
    f = torch.cat([xy, image / sigma_rgb], dim=1)  # B x 5 x H x W
    return f.flatten(2).transpose(1, 2)  # B x HW x 5


def gaussian_filter(image: torch.Tensor, values: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """(W V)_p = sum_q exp(-|f_p - f_q|^2 / 2) V_q over all pixel pairs, p = q included.

    image B x 3 x H x W, values B x C x H x W; computed in row chunks so that only a
    chunk x HW block of W exists at a time.
    """
    b, c, height, width = values.shape
    hw = height * width
    f = _pixel_features(image, sigma_rgb, sigma_xy)  # B x HW x 5
    v = values.flatten(2).transpose(1, 2)  # B x HW x C
    sq = (f * f).sum(-1)  # B x HW
    chunk = max(1, (1 << 24) // max(1, b * hw))
    out = []
    for start in range(0, hw, chunk):
        fp = f[:, start : start + chunk]  # B x c x 5
        # |f_p - f_q|^2 = |f_p|^2 + |f_q|^2 - 2 f_p.f_q (clamped: rounding can make it slightly negative)
        d2 = (sq[:, start : start + chunk, None] + sq[:, None, :] - 2 * fp @ f.transpose(1, 2)).clamp_min(0)
        out.append(torch.exp(-0.5 * d2) @ v)  # B x c x C
    return torch.cat(out, dim=1).transpose(1, 2).reshape(b, c, height, width)


class _DenseEnergy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, probs, gate, sigma_rgb, sigma_xy):
        ct = _compute_dtype(probs)
        s = probs.to(ct)
        as_ = gate.to(ct)[:, None] * gaussian_filter(image.to(ct), s, sigma_rgb, sigma_xy)
        ctx.save_for_backward(as_)
        ctx.in_dtype = probs.dtype
        return -(s * as_).sum() / probs.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (as_,) = ctx.saved_tensors
        grad_probs = (-2.0 / as_.shape[0]) * grad * as_
        return None, grad_probs.to(ctx.in_dtype), None, None, None


def dense_energy_loss(
    image: torch.Tensor, probs: torch.Tensor, gate: torch.Tensor, sigma_rgb: float, sigma_xy: float
) -> torch.Tensor:
    """E = -(1/B) sum_b sum_c sum_p S_cp AS_cp with AS = gate * (W S), W the exact Gaussian.

    The gradient is dE/dS = -2 AS / B (the published extension's choice); image and gate get
    none. L_reg = 1e-7 x 0.58 x E (the lattice gain, docs/METHOD.md, L_reg) is the caller's.
    """
    return _DenseEnergy.apply(image, probs, gate, float(sigma_rgb), float(sigma_xy))
