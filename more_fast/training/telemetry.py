"""Throughput, ETA, MFU (peak rates) and GPU telemetry (nvidia-ml-py); the FLOP count of a step is the model's
(MoReNet.train_step_flops)."""
from __future__ import annotations

from typing import Optional

import torch

# dense bf16 tensor-core peaks (FLOP/s) of GPUs we may meet; MFU is n/a elsewhere
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 3090": 71e12, "RTX 4090": 165e12}


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
