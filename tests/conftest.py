"""Test setup: the Triton interpreter must be on before anything imports triton."""
import os

# the interpreter's tl.dot goes through numpy: BLAS threads fighting over 2 cores slow it 30x
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():  # on a GPU the gpu-marked tests run the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
