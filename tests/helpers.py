"""What the kernel tests share: the device they run on, the relative error, the tolerances.

Device: CUDA when it is available (the compiled Triton kernels, on CUDA tensors), else the CPU
with the Triton interpreter (tests/conftest.py turns it on before triton is imported, only when
there is no CUDA). Kernel tests build their inputs with the seeded CPU generator, so both devices
see the same numbers, and move them to DEVICE before any op runs: a compiled kernel never gets a
CPU tensor.

Tolerances: relative error ||fused - ref|| / ||ref|| against `kernels.reference` in float64, for
values and gradients. `tol(op, dtype)` is the table below: the interpreter column is what the
tests have always asserted; the CUDA column follows the precision policy (kernels/_launch.py)
and the GPU's approximate math (tl.sqrt -> sqrt.approx.ftz, `/` -> div.full, tl.exp / tl.exp2 ->
ex2.approx, tl.log -> lg2.approx: 1-2 ulp, plus |x| 2^-24 absolute for exp(x) = ex2(x log2 e),
where numpy rounds correctly).

| op        | dtype     | interpreter | CUDA  | why                                                      |
|-----------|-----------|-------------|-------|----------------------------------------------------------|
| affinity  | fp32      | 1e-5        | 1e-5  | 3xTF32 Gram (~2^-21 per product, averaged over D and the |
|           |           |             |       | pairs); sqrt.approx / div.full only in the row norms      |
| affinity  | fp16/bf16 | 1e-2        | 1e-2  | native dot, exact products: the half-precision gradient   |
|           |           |             |       | store (2^-11 / 2^-8 relative) dominates                   |
| affinity  | fp64      | 1e-5        | 1e-5  | computed in fp32 (as fp32)                                |
| lir       | fp32      | 1e-5        | 2e-5  | 3xTF32 logits, then exp / log of logits up to 1/t: ex2 /  |
|           |           |             |       | lg2.approx add ~|z| 2^-23 to each softmax weight          |
| lir       | fp16/bf16 | 1e-2        | 1e-2  | exact products; the half gradient store dominates        |
| lir       | fp64      | 1e-5        | 2e-5  | computed in fp32 (as fp32)                                |
| gcr       | fp32      | 1e-5        | 2e-5  | IEEE dots; a = softmax(s) already turns s's rounding     |
|           |           |             |       | (~1e-7 |s|, |s| ~ 100) into ~1e-5 relative on the CPU;    |
|           |           |             |       | tanh and softmax through ex2.approx add to it             |
| gcr       | fp16      | 1e-2        | 1e-2  | half inputs and outputs (the logits dot is exact)         |
| gcr       | bf16      | 2e-2        | 2e-2  | 8 significant bits of the inputs and outputs              |
| gcr       | fp64      | 1e-12       | 1e-12 | fp64 math is IEEE on both (libdevice exp, sqrt.rn.f64)    |
| attention | all       | 1e-5        | 2e-5  | fp32 output of exact products; on CUDA the probabilities |
|           |           |             |       | go through ex2.approx (~2 ulp + |s| 2^-24)                |
| par       | all       | 1e-5        | 2e-5  | fp32 output; exp of the affinities through ex2.approx     |
"""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_CUDA = DEVICE.type == "cuda"

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

_INTERP = {
    "affinity": {F32: 1e-5, F16: 1e-2, BF16: 1e-2, F64: 1e-5},
    "lir": {F32: 1e-5, F16: 1e-2, BF16: 1e-2, F64: 1e-5},
    "gcr": {F64: 1e-12, F32: 1e-5, F16: 1e-2, BF16: 2e-2},
    "attention": {F32: 1e-5, F16: 1e-5, BF16: 1e-5},
    "par": {F32: 1e-5, F16: 1e-5, BF16: 1e-5, F64: 1e-5},
}
# CUDA entries that differ from the interpreter's (the table above says why)
_CUDA = {
    ("lir", F32): 2e-5,
    ("lir", F64): 2e-5,
    ("gcr", F32): 2e-5,
    ("attention", F32): 2e-5,
    ("attention", F16): 2e-5,
    ("attention", BF16): 2e-5,
    ("par", F32): 2e-5,
    ("par", F16): 2e-5,
    ("par", BF16): 2e-5,
    ("par", F64): 2e-5,
}


def tol(op: str, dtype: torch.dtype) -> float:
    """The relative-error bound of `op` for inputs of `dtype` on DEVICE (the table above)."""
    if ON_CUDA and (op, dtype) in _CUDA:
        return _CUDA[(op, dtype)]
    return _INTERP[op][dtype]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (on b's device)."""
    a, b = a.double().to(b.device), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def on_device(*tensors: torch.Tensor):
    """The tensors on DEVICE (one tensor: the tensor; several: a tuple)."""
    out = tuple(t.to(DEVICE) for t in tensors)
    return out[0] if len(out) == 1 else out


def to_device_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of t on DEVICE with t's strides (a transposed or strided layout stays one; t must
    not overlap itself, e.g. no expanded dims)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=DEVICE)
    return out.copy_(t)


def force_backend(monkeypatch, mode: str) -> None:
    """The fused-op backend for the rest of one test, as `kernels.use_backend(mode)` would set it
    (monkeypatch restores it at teardown)."""
    import kernels

    monkeypatch.setattr(kernels, "_MODE", kernels._parse_mode(mode, "mode"))


# ---------------------------------------------------------------------------------------------
# torchrun: several processes of scripts/train.py on this machine (gloo on the CPU)
# ---------------------------------------------------------------------------------------------
# the end of every torchrun worker: scripts/train.py's main(), unchanged, after the worker's patches
_RUN_TRAIN_MAIN = """
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("train_script", {script!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
sys.exit(_module.main())
"""


def torchrun_worker(path, body: str, script) -> str:
    """Write a torchrun worker to `path`: `body` (its patches: Python, already formatted), then
    scripts/train.py's main(). Returns the path as a string."""
    path.write_text(body + _RUN_TRAIN_MAIN.format(script=str(script)))
    return str(path)


def torchrun_cmd(worker, *argv, nproc: int = 2) -> list:
    """`nproc` processes of `worker` under torchrun, one standalone rendezvous on this machine. The
    argv should hold --device cpu: with --device auto, rank 1 of a 1-GPU machine asks for cuda:1."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(worker), *map(str, argv)]
