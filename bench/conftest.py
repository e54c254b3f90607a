"""Benchmarks run on CUDA when present; on the CPU the Triton cases skip (see bench/common.py)."""
import os

import pytest


@pytest.fixture(autouse=True)
def _backend_env():
    """Each case sets MORE_FAST_KERNELS for itself; restore it afterwards."""
    saved = os.environ.get("MORE_FAST_KERNELS")
    yield
    if saved is None:
        os.environ.pop("MORE_FAST_KERNELS", None)
    else:
        os.environ["MORE_FAST_KERNELS"] = saved
