"""File I/O shared by checkpoints, conversion and training: safe torch loading, state-dict files,
atomic saves. No model knowledge (so every module may import it without a cycle)."""
from __future__ import annotations

import importlib
import os
import pathlib
import pickle
from typing import Any

import torch

WRAPPER_KEYS = ("model", "state_dict", "model_state")
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_prefixes(state: dict) -> dict:
    """Keys without a leading 'module.' (DDP) or '_orig_mod.' (torch.compile), however nested."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def torch_load(path: str | pathlib.Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True. Training checkpoints also hold NumPy RNG states; those
    NumPy types (and only those) are allowed. Anything else is refused rather than unpickled."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        foreign = [name for name in names if not name.startswith("numpy")]
        if foreign or not names:
            raise ValueError(f"{path}: holds Python objects other than tensors and NumPy arrays "
                             f"({foreign or err}); refusing to unpickle it. If you trust the file, save its "
                             "state dict alone: torch.save(torch.load(path, weights_only=False)['model'], out)") from None
        allowed = [_resolve_global(name) for name in names] + _numpy_types()
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)


def _numpy_types() -> list:
    """NumPy's dtype classes and scalar constructor (an RNG state pickles through them)."""
    import numpy as np

    codes = "?bBhHiIlLqQefdgFDG"
    found = [type(np.dtype(code)) for code in codes]
    try:
        found.append(_resolve_global("numpy._core.multiarray.scalar"))
    except (ImportError, AttributeError):
        found.append(_resolve_global("numpy.core.multiarray.scalar"))
    return found


def _resolve_global(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def read_state_dict(path: str | pathlib.Path) -> dict:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file; unwraps 'model'/'state_dict'
    and strips a 'module.' prefix."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch_load(path)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(f"pretrained: cannot read {path} ({type(err).__name__}: {err})") from err
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained: {path} does not hold a state dict (name -> tensor)")
    return strip_prefixes(state)


def save_atomic(obj: dict, path: pathlib.Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a part
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
