"""Shared benchmark plumbing: variants of an op, timing with device sync, peak memory, GPU info.

Every benchmark in bench/ goes through `measure`, so every row of the report carries the same
`extra_info` keys: variant, pass (fwd / fwd+bwd), shape, median_ms, GB/s or TFLOP/s (from
the byte / FLOP count the case passes), peak_mem_MiB (CUDA only) and the device, and, when the
case passes an ideal count, the op's floor at the H100's figures (`floor`): the time the ideal
bytes, FLOPs and transcendentals would take at the H100 SXM's peak rates, whichever is longest.
"""
from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch

import kernels
from kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ("reference_eager", "reference_compiled", "fused")

# H100 SXM peak rates for the floors: HBM3 bandwidth, dense bf16 tensor-core FLOP/s (both from the
# datasheet) and the MUFU rate (ex2, lg2, rsqrt, sqrt, tanh, rcp: 16 per clock per SM, x 132 SMs
# x the 1.83 GHz boost clock the 989 TFLOP/s figure assumes).
H100_BYTES_PER_S = 3.35e12
H100_FLOPS_PER_S = 989e12
H100_MUFU_PER_S = 16 * 132 * 1.83e9


def floor(nbytes: float | None = None, flops: float | None = None,
          transcendentals: float | None = None) -> dict:
    """The op's floor on an H100: {"floor_ms", "floor_bound"} ("memory", "compute" or "mufu"),
    the longest of ideal bytes / 3.35 TB/s, ideal FLOPs / 989 TFLOP/s and transcendentals / MUFU
    rate. Empty when no count is given."""
    times = {}
    for bound, count, rate in (("memory", nbytes, H100_BYTES_PER_S), ("compute", flops, H100_FLOPS_PER_S),
                               ("mufu", transcendentals, H100_MUFU_PER_S)):
        if count is not None and count < 0:
            raise ValueError(f"floor: expected a non-negative {bound} count, got {count}")
        if count:
            times[bound] = count / rate
    if not times:
        return {}
    bound = max(times, key=times.get)
    return {"floor_ms": times[bound] * 1e3, "floor_bound": bound}


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
        fn = getattr(kernels, op)

        @functools.wraps(fn)
        def fused(*args, **kwargs):
            with kernels.use_backend("triton"):  # never the reference by accident
                return fn(*args, **kwargs)

        return fused
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def measure(benchmark, fn: Callable, *, variant: str, pass_: str, shape: dict,
            nbytes: float | None = None, flops: float | None = None, transcendentals: float | None = None,
            rounds: int | None = None, warmup: int = 2):
    """Time `fn()` (synchronized) with pytest-benchmark and record throughput, peak memory and the
    H100 floor of the ideal counts (`floor`), with the median's percentage of it."""
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
    bound = floor(nbytes, flops, transcendentals)
    if bound:
        info["floor_ms"] = round(bound["floor_ms"], 6)
        info["floor_bound"] = bound["floor_bound"]
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
        if bound and median > 0:
            info["pct_of_floor"] = round(100.0 * bound["floor_ms"] / (median * 1e3), 2)
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
