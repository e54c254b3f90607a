"""FLOP counts of MoRe's networks (matmuls only), for throughput and MFU: MoReNet.train_step_flops."""
from __future__ import annotations

from typing import Sequence


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one image through the ViT blocks: qkv + proj + MLP + attention."""
    per_block = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim
    return depth * per_block


def decoder_flops(grid: int, dim: int, num_classes: int, hidden: int) -> float:
    """The LargeFOV decoder on a grid of `grid` patches: two dilated 3x3 convs and the 1x1 classifier."""
    return 2 * grid * (dim * hidden * 9 + hidden * hidden * 9 + hidden * (num_classes + 1))


def step_flops(crop: int, batch: int, dim: int, depth: int, num_prefix: int, num_classes: int,
               scales: Sequence[float], patch: int, hidden: int) -> float:
    """FLOPs of one training step: forward + backward (3x forward) of the training pass, plus the
    no-grad multi-scale CAM passes ([x, flip x] per scale, only the flip at 1.0, which is reused)."""
    def image_forward(size: int) -> float:
        n = (size // patch) ** 2
        return vit_forward_flops(n + num_prefix, dim, depth)

    train = 3 * batch * (image_forward(crop) + decoder_flops((crop // patch) ** 2, dim, num_classes, hidden))
    cams = 0.0
    for s in scales:
        images = batch if s == 1.0 else 2 * batch
        cams += images * image_forward(int(s * crop))
    return train + cams
