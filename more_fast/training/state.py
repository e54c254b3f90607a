"""Checkpoints: written atomically, holding everything needed to resume exactly (SPEC, issue 9)."""
from __future__ import annotations

import os
import pathlib
import random
import re
import sys
from typing import Optional

import numpy as np
import torch

CKPT_RE = re.compile(r"ckpt_(\d{8})\.pt$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: pathlib.Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(out: pathlib.Path, iteration: int) -> pathlib.Path:
    return out / "checkpoints" / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(folder: pathlib.Path) -> list[pathlib.Path]:
    """Checkpoints in `folder` (or its checkpoints/ subfolder), newest first."""
    folder = pathlib.Path(folder)
    sub = folder / "checkpoints"
    search = sub if sub.is_dir() else folder
    found = [p for p in search.iterdir() if CKPT_RE.search(p.name)] if search.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.search(p.name).group(1)), reverse=True)


def load_latest(folder: pathlib.Path, map_location="cpu") -> tuple[Optional[dict], Optional[pathlib.Path]]:
    """The newest checkpoint that loads; a truncated or corrupt one is reported and skipped."""
    folder = pathlib.Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"--resume: no such folder {folder}")
    for path in list_checkpoints(folder):
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
                raise ValueError("not a more_fast training checkpoint")
            return state, path
        except Exception as err:  # report it by name and fall back to the previous one
            print(f"warning: checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                  "trying the previous one", file=sys.stderr)
    return None, None
