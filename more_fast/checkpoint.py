"""Project checkpoints -> MoReNet (`load_model`, `load_checkpoint`).

Two kinds of files meet here (timm backbone weights, `--pretrained`, are more_fast/model/pretrained.py's):
- a checkpoint this project writes: a training checkpoint (Trainer.save: {"model", "model_config",
  "optimizer", ...}) or a converted published one (scripts/convert_checkpoint.py: {"model",
  "model_config", ...}); `load_model` turns either into a MoReNet in eval mode;
- a published MoRe checkpoint, which `load_model` also accepts, converting it in memory
  (more_fast.convert; converting once with scripts/convert_checkpoint.py saves that work).
"""
from __future__ import annotations

import pathlib
from typing import Any

import torch
import torch.nn as nn

from .convert import convert_state_dict
from .io import read_state_dict, strip_prefixes, torch_load
from .model.network import model_from_config

def load_model(path: str | pathlib.Path, map_location: Any = "cpu"):
    """A MoReNet in eval mode from a checkpoint file: a training checkpoint (Trainer.save), a
    converted published checkpoint (scripts/convert_checkpoint.py), both {"model", "model_config"},
    or a published MoRe checkpoint (converted here in memory).

    map_location: where the weights go ("cpu", "cuda", "cuda:1", a torch.device, ...).
    """
    return load_checkpoint(path, map_location)[0]


def load_checkpoint(path: str | pathlib.Path, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """(MoReNet in eval mode, the checkpoint's other entries): a training checkpoint's "config"
    (the TrainConfig as a dict) and "iteration", for instance; {} for a published checkpoint."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    obj = read_state_dict(path) if path.suffix == ".safetensors" else torch_load(path, map_location="cpu")
    if isinstance(obj, dict) and "model" in obj and "model_config" in obj:
        state, config = obj["model"], dict(obj["model_config"])
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint: {path} has a 'model' entry that is not a state dict")
        state = strip_prefixes(state)
        meta = {key: value for key, value in obj.items() if key not in ("model", "optimizer", "scheduler", "rng")}
    elif isinstance(obj, dict):
        try:
            state, config, _ = convert_state_dict(obj)
            meta = {}
        except ValueError as err:
            raise ValueError(f"checkpoint: {path} is neither a more_fast checkpoint ({{'model', "
                             f"'model_config'}}) nor a published MoRe checkpoint: {err}") from None
    else:
        raise ValueError(f"checkpoint: {path} does not hold a dict (got {type(obj).__name__})")
    model = model_from_config(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not match the config
        raise ValueError(f"checkpoint: {path} does not match MoReNet({config}): {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint: {path} does not match MoReNet({config}): missing "
                         f"{result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
                         f"unexpected {result.unexpected_keys[:5]}"
                         f"{'...' if len(result.unexpected_keys) > 5 else ''}")
    if isinstance(map_location, (str, torch.device)):
        model.to(torch.device(map_location))
    return model.eval(), meta
