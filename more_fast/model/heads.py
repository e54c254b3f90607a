"""Heads of MoRe (docs/METHOD.md, Network): the classifiers (1x1 convs, no bias) and the LargeFOV decoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .published import DECODER_DIM


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B x N x D -> B x D x h x w."""
    b, n, d = tokens.shape
    h, w = grid
    return tokens.transpose(1, 2).reshape(b, d, h, w)


def classifier_logits(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """logits = W . GMP(P): B x N x D -> B x K (global max pool over the grid, then the 1x1 conv)."""
    pooled = tokens.amax(dim=1)  # B x D
    return pooled @ conv.weight.flatten(1).t().to(pooled.dtype)


def classifier_cam(conv: nn.Conv2d, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CAM = W * P, the 1x1 conv over the grid before pooling: B x N x D -> B x K x h x w."""
    return F.conv2d(tokens_to_map(tokens, grid), conv.weight.to(tokens.dtype))


def make_classifier(dim: int, num_classes: int) -> nn.Conv2d:
    return nn.Conv2d(dim, num_classes, 1, bias=False)


class LargeFOV(nn.Module):
    """3x3 conv D->hidden (dilation 5), ReLU, 3x3 conv hidden->hidden (dilation 5), ReLU, 1x1 conv -> K+1
    (published: hidden 512)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = DECODER_DIM, dilation: int = 5, bias: bool = False):
        super().__init__()
        self.conv6 = nn.Conv2d(dim, hidden, 3, padding=dilation, dilation=dilation, bias=bias)
        self.conv7 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation, bias=bias)
        self.conv8 = nn.Conv2d(hidden, num_classes + 1, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x D x h x w -> B x (K+1) x h x w."""
        x = F.relu(self.conv6(x))
        x = F.relu(self.conv7(x))
        return self.conv8(x)
