"""Throughput, ETA, FLOP count of a training step, MFU and GPU telemetry (nvidia-ml-py)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# dense bf16 tensor-core peaks (FLOP/s) of GPUs we may meet; MFU is n/a elsewhere
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 3090": 71e12, "RTX 4090": 165e12}


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one image through the ViT blocks: qkv + proj + MLP + attention."""
    per_block = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim
    return depth * per_block


def decoder_flops(grid: int, dim: int, num_classes: int, hidden: int = 512) -> float:
    return 2 * grid * (dim * hidden * 9 + hidden * hidden * 9 + hidden * (num_classes + 1))


def step_flops(crop: int, batch: int, dim: int, depth: int, num_prefix: int, num_classes: int,
               scales: Sequence[float], patch: int = 16, hidden: int = 512) -> float:
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


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def gpu_telemetry(device: torch.device) -> dict:
    """Utilization, memory and power from nvidia-ml-py; empty off CUDA or without NVML."""
    if device.type != "cuda":
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"gpu_util": util.gpu, "gpu_mem_used_MiB": mem.used // 2**20,
                "power_W": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000}
    except Exception:  # telemetry must never stop training
        return {}


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
