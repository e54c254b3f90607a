"""Launch helpers shared by the Triton op modules (no kernels here)."""
from __future__ import annotations

import contextlib

import torch
import triton


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def f32_precision(device: torch.device) -> str:
    """fp32-accurate tl.dot: 3xTF32 on NVIDIA tensor cores (sm80+), IEEE FMA elsewhere."""
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    """The next power of two of x, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile contract (scripts/aot_report.py, tests/test_aot.py).
#
# Every Triton module exposes `aot_configs(case: AotCase) -> list[KernelConfig]`: the kernels its
# launcher would run for that case, with the block sizes / warps / stages chosen by the SAME
# config functions the launcher calls (no copied heuristics). The report compiles each with
# triton.compile(ASTSource(fn, signature, constexprs=...), target=GPUTarget("cuda", cc, 32)).
# ---------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class AotCase:
    """A production shape the report compiles for. dtype: the dtype the training step feeds."""

    name: str  # e.g. "voc", "coco", "n3136"
    B: int = 4  # images
    K: int = 20  # classes
    N: int = 784  # patches (28 x 28 at the 448 crop)
    D: int = 768  # token width
    heads: int = 12
    T: int = 808  # tokens of the ViT (R + K + N)
    H: int = 224  # L_reg / PAR height (energy: 0.5 of the crop; PAR: 0.5 of the crop too)
    W: int = 224
    C: int = 21  # energy channels (K + 1); PAR channels are 2 (K + 1) by the op's callers
    dtype: str = "bf16"  # "bf16" | "fp16" | "fp32"
    cc: int = 90  # compute capability the config is chosen for (80 or 90)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One kernel as its launcher would launch it for an AotCase."""

    name: str  # readable name, e.g. "energy_fwd"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # argument name -> value (every constexpr argument, DOT precision included)
    num_warps: int
    num_stages: int
    shapes: str = ""  # short description for the report, e.g. "B4 C21 224x224"
