"""Launch helpers shared by the Triton op modules (no kernels here)."""
from __future__ import annotations

import contextlib

import torch
import triton


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def f32_precision(device: torch.device) -> str:
    """fp32-accurate tl.dot: 3xTF32 on NVIDIA tensor cores (sm80+), IEEE FMA elsewhere."""
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    """The next power of two of x, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))
