"""more_fast: MoRe (AAAI 2025) weakly supervised semantic segmentation with fused kernels.

`more_fast.load_model(path)` returns a MoReNet in eval mode from any checkpoint the project
writes (training checkpoints, converted published ones). Submodules load lazily.
"""

from ._kernels_check import check_kernels_package as _check_kernels_package

_check_kernels_package()  # before anything imports the wrong `kernels`

__version__ = "0.1.0"


def load_model(path, map_location="cpu"):
    """A MoReNet in eval mode from a checkpoint file (see more_fast.checkpoint.load_model)."""
    from .checkpoint import load_model as _load_model

    return _load_model(path, map_location=map_location)


__all__ = ["__version__", "load_model"]
