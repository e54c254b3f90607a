"""Launch helpers shared by the Triton op modules (no kernels here)."""
from __future__ import annotations

import contextlib
import inspect

import torch
import triton


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def capability(device: torch.device) -> int:
    """The compute capability of a CUDA device as one number: 80 for sm_80, 90 for sm_90."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def interpreted(device: torch.device) -> bool:
    """Whether a launch on `device` runs under the Triton interpreter (any non-CUDA tensor)."""
    return device.type != "cuda"


# ---------------------------------------------------------------------------------------------
# The precision policy of every tl.dot in the Triton ops (one place; the op modules only pick
# their fp32 mode, below, and call `dot_config`).
#
# - fp16 / bf16 operands (all of one half dtype): on CUDA straight to tl.dot, natively on the
#   tensor cores (mma.sync / wgmma) with fp32 accumulation. A half x half product is exact in
#   fp32, so this is as accurate as any upcast, at the full half-precision rate and half the
#   shared memory of an fp32 tile.
# - Under the interpreter (CPU tensors), bf16 tiles are upcast to fp32 first: the interpreter's
#   bf16 tl.dot returns garbage. fp16 and fp32 dots work there and run as they are.
# - fp32 operands: one choice per op (its `F32_DOT`), applied on NVIDIA sm80+:
#     "tf32x3"  3xTF32 on the tensor cores, close to fp32 (each product to ~2^-21 relative,
#               fp32's is 2^-24): the ops whose cost is a large Gram-type product (affinity
#               N x N x D, LIR K x N x D and its backward; the energy picks its own);
#     "ieee"    exact fp32 FMA products: ops where a tiny logit change flips a discrete choice
#               (GCR's top-k neighbour selection, its one-hot scatter) or is amplified by a
#               softmax exponent over few short dots (class-patch attention, d = 64).
#   Elsewhere (pre-sm80, ROCm, the interpreter) every fp32 dot is "ieee".
# - Mixed operand dtypes, and fp64 in the ops that compute in fp32, are upcast to fp32 and
#   follow the op's fp32 choice; fp64 compute (GCR's fp64 path) is always "ieee" in fp64.
# ---------------------------------------------------------------------------------------------
F32_MODES = ("tf32x3", "ieee")
_HALF = (torch.float16, torch.bfloat16)


def f32_precision(device: torch.device, mode: str = "tf32x3") -> str:
    """tl.dot input_precision for fp32 operands of an op whose fp32 choice is `mode`: the mode on
    NVIDIA sm80+ (where tf32x3 has tensor cores), "ieee" elsewhere and under the interpreter."""
    if mode not in F32_MODES:
        raise ValueError(f"mode: expected one of {F32_MODES}, got {mode!r}")
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 8:
        return mode
    return "ieee"


def dot_config(dtypes, device: torch.device, f32_mode: str, compute: torch.dtype = torch.float32,
               cuda: bool | None = None) -> tuple[bool, str]:
    """(upcast the loaded tiles to the compute dtype before tl.dot, tl.dot input_precision).

    dtypes: the operand dtype, or a sequence of the operands' dtypes. compute: the dtype the op
    accumulates in (fp32; fp64 for GCR's fp64 path). cuda: compile for a GPU (default: the
    device is CUDA); the ahead-of-time report passes True without a device, where the fp32
    mode is taken as it is (the targets are sm80+)."""
    dts = tuple(dtypes) if isinstance(dtypes, (tuple, list)) else (dtypes,)
    on_gpu = (device.type == "cuda") if cuda is None else cuda
    if dts[0] in _HALF and all(dt == dts[0] for dt in dts):
        if on_gpu:
            return False, "tf32"  # input_precision does not act on half operands; tf32 is the default
        return dts[0] == torch.bfloat16, "ieee"
    if compute == torch.float64:
        return any(dt != torch.float64 for dt in dts), "ieee"
    upcast = any(dt != torch.float32 for dt in dts)
    if cuda is None:
        return upcast, f32_precision(device, f32_mode)
    return upcast, f32_mode if cuda else "ieee"


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
    # (argument index,) -> [["tt.divisibility", 16]] as the JIT specializes them (`aot_kernel`);
    # None: none (the report then compiles without alignment hints)
    attrs: dict | None = None


_DIV16 = [["tt.divisibility", 16]]


def aot_kernel(name: str, fn, args: dict, num_warps: int, num_stages: int, shapes: str = "") -> KernelConfig:
    """A KernelConfig from the arguments a launch passes, specialized as Triton's JIT does at run
    time (so that the ahead-of-time compile is the kernel the GPU runs). `args` maps every
    argument of `fn` to:
    - for a constexpr parameter: its value;
    - for a pointer: its type string ("*bf16", "*fp32", "*i64", ...), taken as 16-byte aligned
      (torch's allocations are);
    - for an integer: its value in the case: 1 becomes a constexpr, i32 or i64 by range, and a
      multiple of 16 carries divisibility 16 (both as the JIT specializes);
    - for a float: any float (fp32).
    """
    if hasattr(fn, "params"):  # a JITFunction
        arg_names = list(fn.arg_names)
        const_names = {p.name for p in fn.params if p.is_constexpr}
    else:  # the interpreter's InterpretedFunction (TRITON_INTERPRET=1): read the Python signature
        params = inspect.signature(fn.fn).parameters
        arg_names = list(params)
        const_names = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    missing = [n for n in arg_names if n not in args]
    extra = [n for n in args if n not in arg_names]
    if missing or extra:
        raise ValueError(f"args: {name} misses {missing}, has unknown {extra}")
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(arg_names):
        v = args[arg]
        if arg in const_names:
            signature[arg], constexprs[arg] = "constexpr", v
        elif isinstance(v, str) and v.startswith("*"):
            signature[arg], attrs[(i,)] = v, _DIV16
        elif isinstance(v, bool):
            signature[arg] = "u1"
        elif isinstance(v, int):
            if v == 1:
                signature[arg], constexprs[arg] = "constexpr", 1
                continue
            signature[arg] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = _DIV16
        elif isinstance(v, float):
            signature[arg] = "fp32"
        else:
            raise TypeError(f"args[{arg!r}]: expected a constexpr value, '*dtype', int or float, got {v!r}")
    return KernelConfig(name, fn, signature, constexprs, num_warps, num_stages, shapes, attrs)


def op_default(public_op, arg: str):
    """The default of argument `arg` of a public op (kernels/__init__.py, the one place the ops'
    defaults are defined): what an op module's `aot_configs` compiles for unless told otherwise."""
    return inspect.signature(public_op).parameters[arg].default


TL_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
AOT_DEVICE = torch.device("cuda")  # a device object only: nothing runs on it
DEFAULT_STAGES = 3  # num_stages of a launch that passes none (Triton's CUDA backend default)
