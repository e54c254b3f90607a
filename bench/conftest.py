"""Benchmarks run on CUDA when present; on the CPU the Triton cases skip (see bench/common.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """On the CPU, one intra-op thread: the 2-core machines this runs on are shared, and with 2
    threads a step of many small ops stalls on thread barriers whenever another process holds a
    core (measured on such a machine, same minute: 0.3 s per training step with 1 thread, 1 to
    36 s with 2). extra_info records the thread count."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _room_for_recompiles():
    """Each shape / dtype / pass (and CAM scale) is a dynamo cache entry of the same function: keep
    the compiled variants compiled rather than falling back to eager at the default limit."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(64, getattr(cfg, name))}):
        yield
