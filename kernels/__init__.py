"""The fused ops of more_fast: one public function each.

Each public function below is the whole contract of its op in one place: its defaults (defined
here only; `kernels.reference` and the Triton launchers take the values passed), one check of its
inputs (kernels/_checks.py, the same for both backends), the backend, and a plain call of either
the op module's entry (kernels/<op>.py: the Triton kernels, their launcher, the
`more_fast::<op>` custom_op) or `kernels.reference` (the plain-PyTorch oracle, which checks
nothing itself).

Backend per call: the innermost active `use_backend(mode)` block, else `auto`. Modes:
- `auto` (default): Triton on CUDA tensors, and on CPU tensors when `TRITON_INTERPRET=1`
  (the interpreter); the reference otherwise;
- `triton`: always the Triton kernels (on the CPU this needs `TRITON_INTERPRET=1`, set before
  triton is imported);
- `reference`: always `kernels.reference`.
Without triton (a Linux-only dependency) the op modules are not imported: `auto` runs the
reference and `triton` raises NotImplementedError.
The scripts' `--kernels` flag (default: env `MORE_FAST_KERNELS`, else auto) is resolved once per
run by `choose_backend` and entered with `use_backend`; nothing here reads the environment.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from . import _checks, reference

__more_fast__ = True  # more_fast/_kernels_check.py reads this line to tell this package from PyPI's `kernels`

# plain imports, so that each public op below reads through to its kernels; triton is a Linux-only
# dependency, and without it only the reference exists
try:
    from . import affinity, attention, energy, gcr, lir, par
except ModuleNotFoundError as err:
    if err.name != "triton":
        raise
    affinity = attention = energy = gcr = lir = par = None

BACKENDS = ("auto", "triton", "reference")
OPS = ("affinity_loss", "lir_loss", "gcr_aggregate", "class_patch_attention", "par_refine", "dense_energy_loss")
# every op has its Triton module: they load together, or (no triton) none does
_TRITON_LOADED = affinity is not None


# triton reads TRITON_INTERPRET once, when it is imported (above, through the op modules): so do we.
# A constant also keeps the environment out of every compiled region that dispatches an op.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """Whether the Triton kernels run under the interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


# the innermost use_backend mode. A module global, as timm holds `fused_attn`: torch.compile (torch
# 2.11's dynamo included, which cannot trace ContextVar.get) reads it while tracing and guards on
# its value, so a graph traced under one mode is not reused under another. One process-wide mode:
# a block entered in one thread is seen by all of them.
_MODE = "auto"


def _parse_mode(value, name: str) -> str:
    mode = value.strip().lower() if isinstance(value, str) else value
    if mode not in BACKENDS:
        raise ValueError(f"{name}: expected one of {BACKENDS}, got {value!r}")
    return mode


@contextlib.contextmanager
def use_backend(mode: str):
    """Run the fused ops with backend `mode` ("auto", "triton" or "reference") inside the block.

    Blocks nest (the innermost wins) and the previous mode comes back when the block exits,
    by an exception too. Outside every block the mode is "auto"."""
    global _MODE
    previous, _MODE = _MODE, _parse_mode(mode, "use_backend")
    try:
        yield
    finally:
        _MODE = previous


def backend_mode() -> str:
    """The mode in force: the innermost use_backend, else "auto"."""
    return _MODE


def triton_available(op: str) -> bool:
    """Whether `op` (a name in OPS) has its Triton implementation loaded (triton is importable)."""
    return _TRITON_LOADED and op in OPS


def _choose(mode: str, device: torch.device, what: str) -> str:
    if mode == "reference":
        return "reference"
    runnable = device.type == "cuda" or interpreter_enabled()
    if mode == "auto":
        return "triton" if runnable and _TRITON_LOADED else "reference"
    if not _TRITON_LOADED:
        raise NotImplementedError(f"{what}: no Triton implementation is available (backend 'triton')")
    if not runnable:
        raise RuntimeError(
            f"{what}: backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
            "set before triton is imported (or a CUDA tensor)"
        )
    return "triton"


def choose_backend(mode: str, device) -> str:
    """What `mode` ("auto", "triton" or "reference") runs on `device`: "triton" or "reference".

    A run resolves its `--kernels` once with this, before any work (a "triton" that cannot run
    there raises here), holds the answer, prints it, and enters `use_backend(answer)`: as timm
    resolves `fused_attn` once and holds it. A bad `mode`, or "triton" where it cannot run, is a
    ValueError naming `kernels`."""
    mode, device = _parse_mode(mode, "kernels"), torch.device(device)
    if mode == "triton" and not _TRITON_LOADED:
        raise ValueError("kernels: 'triton' needs the triton package, which is not installed here "
                         "(a Linux-only dependency); use auto or reference")
    if mode == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"kernels: 'triton' cannot run on {device}: it needs a CUDA device, or "
                         "TRITON_INTERPRET=1 set before triton is imported (the interpreter); use auto or reference")
    return _choose(mode, device, "kernels")


def resolve_backend(op: str, device: torch.device) -> str:
    """'triton' or 'reference' for `op` on `device`, per `backend_mode()`."""
    if op not in OPS:
        raise ValueError(f"resolve_backend: expected an op in {OPS}, got {op!r}")
    return _choose(backend_mode(), device, op)


def affinity_loss(tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """L_ptc (docs/METHOD.md, Losses): B x N x D tokens, B x N integer labels -> scalar loss."""
    _checks.check_affinity_loss(tokens, labels, ignore_index)
    if resolve_backend("affinity_loss", tokens.device) == "triton":
        return affinity.affinity_loss(tokens, labels, ignore_index)
    return reference.affinity_loss(tokens, labels, ignore_index)


def lir_loss(
    cls_tokens: torch.Tensor,
    patch_tokens: torch.Tensor,
    labels: torch.Tensor,
    cls_labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """L_cre (docs/METHOD.md, Losses): B x K x D, B x N x D, B x N labels, B x K {0,1} -> scalar loss."""
    _checks.check_lir_loss(cls_tokens, patch_tokens, labels, cls_labels, temperature)
    if resolve_backend("lir_loss", cls_tokens.device) == "triton":
        return lir.lir_loss(cls_tokens, patch_tokens, labels, cls_labels, float(temperature))
    return reference.lir_loss(cls_tokens, patch_tokens, labels, cls_labels, temperature)


def gcr_aggregate(h: torch.Tensor, e: torch.Tensor, k: int, score: str = "published") -> torch.Tensor:
    """GCR aggregation (docs/METHOD.md, GCR): B x K x D heads, B x L x D nodes -> M, B x K x D."""
    _checks.check_gcr_aggregate(h, e, k, score)
    if resolve_backend("gcr_aggregate", h.device) == "triton":
        return gcr.gcr_aggregate(h, e, k, score)
    return reference.gcr_aggregate(h, e, k, score)


def class_patch_attention(
    q: torch.Tensor, k: torch.Tensor, num_prefix: int, num_cls: int, reduce: str = "mean_softmax"
) -> torch.Tensor:
    """Class-patch attention (docs/METHOD.md, Class-patch attention): B x heads x T x d queries and keys -> B x K x N."""
    _checks.check_class_patch_attention(q, k, num_prefix, num_cls, reduce)
    if resolve_backend("class_patch_attention", q.device) == "triton":
        return attention.class_patch_attention(q, k, num_prefix, num_cls, reduce)
    return reference.class_patch_attention(q, k, num_prefix, num_cls, reduce)


def par_refine(
    image: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10,
    affinity_storage: str = "fp32",
) -> torch.Tensor:
    """PAR refinement (docs/METHOD.md, PAR pseudo labels): B x 3 x H x W image, B x C x H x W masks -> refined masks.

    affinity_storage: "fp32" (the published refinement) or "bf16" (the neighbour weights rounded
    to bf16: half their bytes, refined values within (1 +- 2^-8)^num_iter of fp32's)."""
    _checks.check_par_refine(image, masks, dilations, num_iter, affinity_storage)
    if resolve_backend("par_refine", image.device) == "triton":
        return par.par_refine(image, masks, list(dilations), num_iter, affinity_storage)
    return reference.par_refine(image, masks, dilations, num_iter, affinity_storage)


def dense_energy_loss(
    image: torch.Tensor, probs: torch.Tensor, gate: torch.Tensor, sigma_rgb: float, sigma_xy: float
) -> torch.Tensor:
    """Dense CRF energy E (docs/METHOD.md, L_reg; L_reg = 1e-7 x 0.58 x E is the caller's): image,
    probs B x C x H x W, gate B x H x W.

    No default sigmas: the caller scales sigma_xy with the image (more_fast/losses.py reg_loss:
    100 x the downscale), so any fixed default would be wrong somewhere."""
    _checks.check_dense_energy_loss(image, probs, gate, sigma_rgb, sigma_xy)
    if resolve_backend("dense_energy_loss", image.device) == "triton":
        return energy.dense_energy_loss(image, probs, gate, float(sigma_rgb), float(sigma_xy))
    return reference.dense_energy_loss(image, probs, gate, sigma_rgb, sigma_xy)


__all__ = [
    "affinity_loss",
    "lir_loss",
    "gcr_aggregate",
    "class_patch_attention",
    "par_refine",
    "dense_energy_loss",
    "reference",
    "resolve_backend",
    "backend_mode",
    "use_backend",
    "interpreter_enabled",
    "triton_available",
    "BACKENDS",
    "OPS",
]
