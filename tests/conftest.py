"""Test setup: the Triton interpreter must be on before anything imports triton.

With CUDA the kernel tests run the compiled kernels on CUDA tensors (the `device` fixture,
tests/helpers.py); without it, the interpreter on CPU tensors. Tolerances: tests/helpers.py.
"""
import os

# the interpreter's tl.dot goes through numpy: BLAS threads fighting over 2 cores slow it 30x
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# one intra-op thread for every Trainer (more_fast/training/threads.py would otherwise pick it from
# the load of the moment): runs compared bit for bit across processes must sum in the same order
os.environ.setdefault("MORE_FAST_THREADS", "1")

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():  # on a GPU the tests run the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_problem():
    """Why the Triton interpreter of this stack cannot run the kernels, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda text: tuple(int(p) for p in text.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound with numpy "
                f"{numpy.__version__} (it calls int() on a 1-element array, which numpy 2.4 refuses): install "
                f"numpy<2.4 beside triton < 3.7, as .ci/floor.txt pins it")
    return None


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)

from helpers import DEVICE  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker, not item.keywords: those also hold the names of the folders above the test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where the kernel tests put their tensors: CUDA when available, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
