"""The one device resolution of train.py, evaluate.py, infer.py and the Trainer."""
from __future__ import annotations

import os
from typing import Optional

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _have(count: int) -> str:
    if count == 0:
        return "this machine has no CUDA device"
    if count == 1:
        return "this machine has 1 CUDA device (cuda:0)"
    return f"this machine has {count} CUDA devices (cuda:0 to cuda:{count - 1})"


def device_problem(name: str) -> tuple[Optional[torch.device], str]:
    """(the device, "") or (None, why `name` names no device of this machine)."""
    name = str(name).strip().lower()
    if name == "cpu":
        return torch.device("cpu"), ""
    count = _cuda_count()
    if name == "auto" and count == 0:
        return torch.device("cpu"), ""
    if name in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", 0))
    elif name.startswith("cuda:") and name[5:].isdigit():
        index = int(name[5:])
    else:
        return None, f"expected {DEVICE_CHOICES}, got {name!r}"
    if index >= count:
        shown = name if name.startswith("cuda:") else f"{name} (cuda:{index}, from LOCAL_RANK)"
        return None, f"{shown} requested, but {_have(count)}"
    return torch.device("cuda", index), ""


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device that exists here.

    auto and cuda pick cuda:LOCAL_RANK (0 outside torchrun), so each torchrun process takes its
    own GPU; auto falls back to the CPU where there is no GPU. A name that does not exist here is a
    ValueError naming `flag` and what the machine has."""
    device, problem = device_problem(name)
    if device is None:
        raise ValueError(f"{flag}: {problem}")
    return device
