"""Shared benchmark plumbing: variants of an op, timing with device sync, peak memory, GPU info.

Every benchmark in bench/ goes through `measure`, so every row of the report carries the same
`extra_info` keys: variant, pass (fwd / fwd+bwd), shape, median_ms, GB/s or TFLOP/s (from
the byte / FLOP count the case passes), peak_mem_MiB (CUDA only) and the device.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import pytest
import torch

import kernels
from kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ("reference_eager", "reference_compiled", "fused")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def device_info() -> dict:
    """GPU name, driver, clocks and memory from nvidia-ml-py; the CPU otherwise."""
    if DEVICE.type != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads()}
    info = {"device": torch.cuda.get_device_name()}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info.update(
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            memory_total_MiB=pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
        )
    except Exception as err:  # telemetry is informative, never a reason to fail a benchmark
        info["nvml_error"] = repr(err)
    return info


@functools.lru_cache(maxsize=None)
def software_info() -> dict:
    """torch and triton versions, for the report's header (scripts/bench_report.py)."""
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def op_variant(op: str, variant: str) -> Callable:
    """The callable for `op` in one of VARIANTS; skips what cannot run here."""
    if variant == "reference_eager":
        return getattr(reference, op)
    if variant == "reference_compiled":
        return torch.compile(getattr(reference, op))
    if variant == "fused":
        if DEVICE.type != "cuda":
            pytest.skip("fused Triton kernels are timed on CUDA only (interpreter timings mean nothing)")
        if not kernels.triton_available(op):
            pytest.skip(f"{op} has no Triton implementation yet")
        os.environ["MORE_FAST_KERNELS"] = "triton"
        return getattr(kernels, op)
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def measure(benchmark, fn: Callable, *, variant: str, pass_: str, shape: dict,
            nbytes: float | None = None, flops: float | None = None,
            rounds: int | None = None, warmup: int = 2):
    """Time `fn()` (synchronized) with pytest-benchmark and record throughput and peak memory."""
    if rounds is None:
        rounds = 20 if DEVICE.type == "cuda" else 3

    def call():
        out = fn()
        sync()
        return out

    for _ in range(warmup):  # compile and autotune outside the timed rounds
        call()
    peak = None
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(variant=variant, pass_=pass_, shape=shape, **device_info())
    if peak is not None:
        info["peak_extra_mem_MiB"] = round(peak, 2)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        info["median_ms"] = round(median * 1e3, 4)
        if nbytes:
            info["GB/s"] = round(nbytes / median / 1e9, 2)
        if flops:
            info["TFLOP/s"] = round(flops / median / 1e12, 3)
    return result


def fwd_bwd(fn: Callable, *inputs_needing_grad: torch.Tensor) -> Callable:
    """A callable running fn() and the backward of its (scalar or summed) output."""
    def run():
        for t in inputs_needing_grad:
            t.grad = None
        out = fn()
        (out if out.dim() == 0 else out.float().sum()).backward()
        return out

    return run
