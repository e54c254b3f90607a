"""Input validation of the public ops (kernels/__init__.py), for both backends.

Every public op calls its `check_*` function once, before dispatching, so both backends reject
the same inputs with the same message; neither `kernels.reference` nor the Triton launchers
check again. Checks look at metadata only (shape, dtype, device): a value
check would force a host-device synchronization inside the training step.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
LABEL_DTYPES = INT_DTYPES
CLS_LABEL_DTYPES = INT_DTYPES + FLOAT_DTYPES + (torch.bool,)
GCR_SCORES = ("published", "dot")
CPA_REDUCES = ("mean_softmax", "sum_logits")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t, ndim: int, dtypes: Sequence[torch.dtype], what: str) -> None:
    """`t` must be a tensor of rank `ndim` with a dtype in `dtypes`; `what` names the dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims ({what}), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_names(dtypes)}), got {t.dtype}")


def same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected the device of {first_name} ({first.device}), got {t.device}"
            )


def dim_equal(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: expected {what} = {expected}, got {actual}")


def positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name}: expected a positive float, got {value}")
    return float(value)


def integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def check_affinity_loss(tokens, labels, ignore_index) -> None:
    tensor("tokens", tokens, 3, FLOAT_DTYPES, "B x N x D")
    tensor("labels", labels, 2, LABEL_DTYPES, "B x N")
    if tuple(labels.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"labels: expected shape {tuple(tokens.shape[:2])} (B x N of tokens), "
            f"got {tuple(labels.shape)}"
        )
    same_device(tokens=tokens, labels=labels)
    integer("ignore_index", ignore_index, -(2**31), 2**31 - 1)


def check_lir_loss(cls_tokens, patch_tokens, labels, cls_labels, temperature) -> None:
    tensor("cls_tokens", cls_tokens, 3, FLOAT_DTYPES, "B x K x D")
    tensor("patch_tokens", patch_tokens, 3, FLOAT_DTYPES, "B x N x D")
    tensor("labels", labels, 2, LABEL_DTYPES, "B x N")
    tensor("cls_labels", cls_labels, 2, CLS_LABEL_DTYPES, "B x K")
    b, k, d = cls_tokens.shape
    dim_equal("patch_tokens", patch_tokens.shape[0], b, "batch size B of cls_tokens")
    dim_equal("patch_tokens", patch_tokens.shape[2], d, "channel size D of cls_tokens")
    if tuple(labels.shape) != tuple(patch_tokens.shape[:2]):
        raise ValueError(
            f"labels: expected shape {tuple(patch_tokens.shape[:2])} (B x N of patch_tokens), "
            f"got {tuple(labels.shape)}"
        )
    if tuple(cls_labels.shape) != (b, k):
        raise ValueError(
            f"cls_labels: expected shape {(b, k)} (B x K of cls_tokens), got {tuple(cls_labels.shape)}"
        )
    same_device(cls_tokens=cls_tokens, patch_tokens=patch_tokens, labels=labels, cls_labels=cls_labels)
    positive_number("temperature", temperature)


def check_gcr_aggregate(h, e, k, score) -> None:
    tensor("h", h, 3, FLOAT_DTYPES, "B x K x D")
    tensor("e", e, 3, FLOAT_DTYPES, "B x L x D")
    dim_equal("e", e.shape[0], h.shape[0], "batch size B of h")
    dim_equal("e", e.shape[2], h.shape[2], "channel size D of h")
    if e.dtype != h.dtype:
        raise TypeError(f"e: expected the dtype of h ({h.dtype}), got {e.dtype}")
    same_device(h=h, e=e)
    integer("k", k, 1, e.shape[1])
    choice("score", score, GCR_SCORES)


def check_class_patch_attention(q, k, num_prefix, num_cls, reduce) -> None:
    tensor("q", q, 4, FLOAT_DTYPES, "B x heads x T x d")
    tensor("k", k, 4, FLOAT_DTYPES, "B x heads x T x d")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected the dtype of q ({q.dtype}), got {k.dtype}")
    same_device(q=q, k=k)
    if q.shape[-1] < 1:
        raise ValueError(f"q: expected a head size d >= 1, got shape {tuple(q.shape)}")
    t = q.shape[2]
    integer("num_prefix", num_prefix, 0)
    integer("num_cls", num_cls, 1)
    if num_prefix + num_cls >= t:
        raise ValueError(
            f"num_prefix + num_cls: expected < T = {t} (at least one patch token), "
            f"got {num_prefix} + {num_cls}"
        )
    choice("reduce", reduce, CPA_REDUCES)


def non_empty_image(name: str, image: torch.Tensor) -> None:
    """At least one channel and one pixel: an empty image has no neighbours to refine against."""
    if image.shape[1] < 1 or image.shape[2] < 1 or image.shape[3] < 1:
        raise ValueError(f"{name}: expected at least 1 channel and H, W >= 1, got shape {tuple(image.shape)}")


PAR_AFFINITY_STORAGE = ("fp32", "bf16")


def check_par_refine(image, masks, dilations, num_iter, affinity_storage) -> None:
    tensor("image", image, 4, FLOAT_DTYPES, "B x 3 x H x W")
    tensor("masks", masks, 4, FLOAT_DTYPES, "B x C x H x W")
    non_empty_image("image", image)
    if masks.shape[1] < 1:
        raise ValueError(f"masks: expected at least 1 channel, got shape {tuple(masks.shape)}")
    dim_equal("masks", masks.shape[0], image.shape[0], "batch size B of image")
    if tuple(masks.shape[2:]) != tuple(image.shape[2:]):
        raise ValueError(
            f"masks: expected the spatial size of image {tuple(image.shape[2:])}, "
            f"got {tuple(masks.shape[2:])}"
        )
    same_device(image=image, masks=masks)
    if isinstance(dilations, (str, bytes)) or not isinstance(dilations, (list, tuple)):
        raise TypeError(f"dilations: expected a list or tuple of positive ints, got {type(dilations).__name__}")
    if len(dilations) == 0:
        raise ValueError("dilations: expected a non-empty list of positive ints, got []")
    for d in dilations:
        integer("dilations", d, 1, 2**30)  # kernels hold pixel offsets in int32
    integer("num_iter", num_iter, 0)
    if affinity_storage not in PAR_AFFINITY_STORAGE:
        raise ValueError(f"affinity_storage: expected one of {PAR_AFFINITY_STORAGE}, got {affinity_storage!r}")


def check_dense_energy_loss(image, probs, gate, sigma_rgb, sigma_xy) -> None:
    tensor("image", image, 4, FLOAT_DTYPES, "B x 3 x H x W")
    tensor("probs", probs, 4, FLOAT_DTYPES, "B x C x H x W")
    tensor("gate", gate, 3, FLOAT_DTYPES, "B x H x W")
    non_empty_image("image", image)
    if image.shape[0] < 1:
        raise ValueError(f"image: expected a batch of at least 1 (E is averaged over B), got shape {tuple(image.shape)}")
    dim_equal("probs", probs.shape[0], image.shape[0], "batch size B of image")
    if tuple(probs.shape[2:]) != tuple(image.shape[2:]):
        raise ValueError(
            f"probs: expected the spatial size of image {tuple(image.shape[2:])}, "
            f"got {tuple(probs.shape[2:])}"
        )
    expected_gate = (image.shape[0],) + tuple(image.shape[2:])
    if tuple(gate.shape) != expected_gate:
        raise ValueError(f"gate: expected shape {expected_gate} (B x H x W), got {tuple(gate.shape)}")
    same_device(image=image, probs=probs, gate=gate)
    positive_number("sigma_rgb", sigma_rgb)
    positive_number("sigma_xy", sigma_xy)
