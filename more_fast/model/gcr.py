"""Graph Category Representation (GCR, docs/METHOD.md, Network): class tokens refined by their top-k graph neighbours."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .published import GCR_SCORE, TOPK_RATIO


class GCR(nn.Module):
    """Q = LayerNorm(LeakyReLU(linear1(0.1 (H + M) + T)) + LeakyReLU(linear2(0.1 (H * M) + T))).

    H = head_proj(T), E = tail_proj(concat(T, stopgrad(P))), M = kernels.gcr_aggregate(H, E, k)
    with k = int(topk_ratio * K) (at least 1). Parameter names follow the published checkpoints.
    score: "published" (product of sums, docs/METHOD.md, Network) or "dot" (the gated-attention reading).
    """

    def __init__(self, dim: int, topk_ratio: float = TOPK_RATIO, score: str = GCR_SCORE):
        super().__init__()
        if score not in ("published", "dot"):
            raise ValueError(f"score: expected 'published' or 'dot', got {score!r}")
        if not 0 < topk_ratio <= 1:
            raise ValueError(f"topk_ratio: expected in (0, 1], got {topk_ratio}")
        self.dim = dim
        self.topk_ratio = topk_ratio
        self.score = score
        self.head_proj = nn.Linear(dim, dim)
        self.tail_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def topk(self, num_classes: int) -> int:
        return max(1, int(self.topk_ratio * num_classes))

    def forward(self, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """cls_tokens B x K x D, patch_tokens B x N x D -> Q, B x K x D."""
        t = cls_tokens
        x = torch.cat([t, patch_tokens.detach()], dim=1)  # B x (K+N) x D
        h = self.head_proj(t)  # B x K x D
        e = self.tail_proj(x)  # B x (K+N) x D
        if e.dtype != h.dtype:  # mixed precision can leave the two projections in different dtypes
            e = e.to(h.dtype)
        m = kernels.gcr_aggregate(h, e, self.topk(t.shape[1]), self.score)  # B x K x D
        sum_branch = F.leaky_relu(self.linear1(0.1 * (h + m) + t))
        prod_branch = F.leaky_relu(self.linear2(0.1 * (h * m) + t))
        return self.norm(sum_branch + prod_branch)


class NoGCR(nn.Module):
    """The ablation baseline without GCR: the class tokens T pass through unchanged (Q = T).

    No parameters, so that nothing sits in the optimizer or in DDP without a gradient.
    """

    def forward(self, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        return cls_tokens
