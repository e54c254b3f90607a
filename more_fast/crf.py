"""Dense CRF post-processing (docs/METHOD.md, Evaluation): a permutohedral-lattice CRF on the
device of its inputs (more_fast.lattice), or the optional `pydensecrf2` package on the CPU.

The published protocols end with a fully connected CRF (Krähenbühl & Koltun) of 10 mean-field
iterations, a Gaussian kernel (xy std 1, weight 3) and a bilateral kernel (xy std 67, rgb std 3,
weight 4), run on the image at its original resolution, with pydensecrf. Backends:

  lattice     more_fast.lattice: pydensecrf's algorithm (its lattice, point for point; its
              symmetric normalization and mean field) in PyTorch ops, on the device of the
              inputs (NumPy inputs: CUDA where there is a GPU, else the CPU). No extra package.
  pydensecrf  the `pydensecrf2` package (a maintained build of pydensecrf, the package the
              published code uses; `pip install pydensecrf2`, needs a C++ compiler), on the CPU,
              one image at a time: a cross-check, and what scripts/evaluate.py --crf-workers
              spreads over processes.
  auto        the lattice.

Agreement with pydensecrf (tests/test_crf.py, real photographs, 21 labels, the published
settings): measured the same label at 100% of the pixels and marginals within 3.2e-5 (the tests'
bounds: >= 99.9% of the labels, 1e-4).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

CRF_PARAMS = dict(iters=10, pos_xy=1.0, pos_w=3.0, bi_xy=67.0, bi_rgb=3.0, bi_w=4.0)
BACKENDS = ("auto", "lattice", "pydensecrf")
SLACK = 1e-6  # rounding of a resized map in [0, 1]; the unary clips to [1e-5, 1] anyway
INSTALL_HINT = "pip install pydensecrf2 (an optional dependency, built from source: needs a C++ compiler)"

Array = Union[np.ndarray, torch.Tensor]


def crf_available(backend: str = "pydensecrf") -> bool:
    """Whether `backend` can run here: the lattice always can; pydensecrf when it imports."""
    _check_backend(backend)
    if backend != "pydensecrf":
        return True
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def require_crf(backend: str = "auto") -> None:
    if not crf_available(backend):
        raise RuntimeError(f"--crf-backend pydensecrf needs the dense-CRF package: {INSTALL_HINT}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _check_params(iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w) -> None:
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters: expected an integer >= 0, got {iters!r}")
    for name, value in (("pos_xy", pos_xy), ("bi_xy", bi_xy), ("bi_rgb", bi_rgb)):
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite standard deviation > 0, got {value!r}")
    for name, value in (("pos_w", pos_w), ("bi_w", bi_w)):
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)):
            raise ValueError(f"{name}: expected a finite weight, got {value!r}")


def _check_inputs(image: Array, probs: Array, batched: bool) -> None:
    lead = "B x " if batched else ""
    ndim = 4 if batched else 3
    is_t = isinstance(image, torch.Tensor)
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise ValueError(f"image: expected a {lead}H x W x 3 uint8 array or tensor, got {type(image).__name__}")
    dtype_ok = image.dtype == (torch.uint8 if is_t else np.uint8)
    if image.ndim != ndim or image.shape[-1] != 3 or not dtype_ok:
        raise ValueError(f"image: expected {lead}H x W x 3 uint8 (RGB), got {tuple(image.shape)} {image.dtype}")
    if not isinstance(probs, (np.ndarray, torch.Tensor)):
        raise ValueError(f"probs: expected a {lead}C x H x W array or tensor, got {type(probs).__name__}")
    if probs.ndim != ndim:
        raise ValueError(f"probs: expected {lead}C x H x W scores, got shape {tuple(probs.shape)}")
    if tuple(probs.shape[-2:]) != tuple(image.shape[-3:-1]) or (batched and probs.shape[0] != image.shape[0]):
        raise ValueError(f"probs: {tuple(probs.shape)} does not match the image {tuple(image.shape)} "
                         f"(expected {lead}C x H x W of the image's size)")
    if probs.shape[-3] < 1:
        raise ValueError(f"probs: expected at least one label, got shape {tuple(probs.shape)}")
    if isinstance(probs, torch.Tensor):
        if not probs.is_floating_point():
            raise ValueError(f"probs: expected floating-point probabilities, got {probs.dtype}")
        if isinstance(image, torch.Tensor) and image.device != probs.device:
            raise ValueError(f"image: on {image.device}, probs on {probs.device}: expected one device")
        bad = bool(((probs < -SLACK) | (probs > 1 + SLACK) | ~torch.isfinite(probs)).any()) if probs.numel() else False
    else:
        if not np.issubdtype(probs.dtype, np.floating):
            raise ValueError(f"probs: expected floating-point probabilities, got {probs.dtype}")
        bad = bool(((probs < -SLACK) | (probs > 1 + SLACK) | ~np.isfinite(probs)).any()) if probs.size else False
    if bad:
        raise ValueError("probs: expected probabilities (scores in [0, 1], finite); the unary is -log(clip(p, 1e-5))")


def _to_tensor(x: Array, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device)


def _lattice_device(image: Array, probs: Array) -> torch.device:
    for x in (probs, image):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dense_crf(image: Array, probs: Array, iters: int = 10, pos_xy: float = 1.0, pos_w: float = 3.0,
              bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0, backend: str = "auto") -> Array:
    """Mean-field dense CRF. image H x W x 3 uint8, probs C x H x W (scores in [0, 1]; unary
    -log(clip(p, 1e-5))) -> C x H x W float32 marginals, a NumPy array for NumPy probs, else a
    tensor on the probs' device. C = 1 is returned as it is. backend: "auto" (the lattice),
    "lattice" (on the inputs' device; NumPy inputs: CUDA where there is a GPU) or "pydensecrf"."""
    _check_backend(backend)
    _check_params(iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w)
    _check_inputs(image, probs, batched=False)
    params = dict(iters=int(iters), pos_xy=float(pos_xy), pos_w=float(pos_w), bi_xy=float(bi_xy),
                  bi_rgb=float(bi_rgb), bi_w=float(bi_w))
    numpy_out = isinstance(probs, np.ndarray)
    if probs.shape[0] == 1:
        return probs.astype(np.float32) if numpy_out else probs.float()
    if backend == "pydensecrf":
        img = image.cpu().numpy() if isinstance(image, torch.Tensor) else image
        p = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else probs
        q = _pydensecrf(img, p, **params)
        return q if numpy_out else torch.from_numpy(q).to(probs.device)
    from .lattice import dense_crf_batch

    device = _lattice_device(image, probs)
    with torch.no_grad():
        q = dense_crf_batch(_to_tensor(image, device)[None], _to_tensor(probs, device).float()[None], **params)[0]
    return q.cpu().numpy() if numpy_out else q


def dense_crf_images(images: torch.Tensor, probs: torch.Tensor, iters: int = 10, pos_xy: float = 1.0,
                     pos_w: float = 3.0, bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0,
                     impl: str = "csr") -> torch.Tensor:
    """The lattice CRF of B images of one size at once: B x H x W x 3 uint8, B x C x H x W scores
    (one device) -> B x C x H x W float32 marginals, each image's as dense_crf gives it. impl:
    more_fast.lattice.dense_crf_batch's ("csr" or "gather")."""
    _check_params(iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w)
    if not isinstance(images, torch.Tensor) or not isinstance(probs, torch.Tensor):
        raise ValueError("images, probs: expected tensors (dense_crf takes NumPy arrays)")
    _check_inputs(images, probs, batched=True)
    from .lattice import dense_crf_batch

    with torch.no_grad():
        return dense_crf_batch(images, probs.float(), int(iters), float(pos_xy), float(pos_w), float(bi_xy),
                               float(bi_rgb), float(bi_w), impl)


def _pydensecrf(image: np.ndarray, probs: np.ndarray, iters: int, pos_xy: float, pos_w: float, bi_xy: float,
                bi_rgb: float, bi_w: float) -> np.ndarray:
    require_crf("pydensecrf")
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(image), compat=bi_w)
    return np.asarray(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def crf_map_labels(image: Array, maps: Array, present: Array, params: Optional[dict] = None,
                   backend: str = "auto") -> Array:
    """The published LAM/CAM + CRF label map: scores [1 - max_c map_c | maps of the present
    classes] -> CRF -> argmax -> class ids (0 background, c + 1 class c). maps K x H x W in [0, 1],
    present K bool. No present class: all background. NumPy in, H x W uint8 NumPy out; tensors
    in, a uint8 tensor on the maps' device."""
    if isinstance(maps, torch.Tensor):
        keys = torch.nonzero(torch.as_tensor(present, device=maps.device).bool()).flatten()
        h, w = maps.shape[1:]
        if keys.numel() == 0:
            return torch.zeros(h, w, dtype=torch.uint8, device=maps.device)
        valid = maps[keys].float()
        scores = torch.cat([1.0 - valid.amax(dim=0, keepdim=True), valid], dim=0)
        q = dense_crf(image, scores, **(params or CRF_PARAMS), backend=backend)
        ids = torch.cat([keys.new_zeros(1), keys + 1])
        return ids[q.argmax(dim=0)].to(torch.uint8)
    keys = np.flatnonzero(present)
    h, w = maps.shape[1:]
    if keys.size == 0:
        return np.zeros((h, w), dtype=np.uint8)
    valid = maps[keys]
    scores = np.concatenate([1.0 - valid.max(axis=0, keepdims=True), valid], axis=0)
    q = dense_crf(image, scores, **(params or CRF_PARAMS), backend=backend)
    ids = np.concatenate([[0], keys + 1])
    return ids[q.argmax(axis=0)].astype(np.uint8)


def crf_prob_labels(image: Array, probs: Array, params: Optional[dict] = None, backend: str = "auto") -> Array:
    """Decoder + CRF: softmax probabilities (K+1) x H x W -> CRF -> argmax (uint8, NumPy or a tensor as the input)."""
    q = dense_crf(image, probs, **(params or CRF_PARAMS), backend=backend)
    if isinstance(q, torch.Tensor):
        return q.argmax(dim=0).to(torch.uint8)
    return q.argmax(axis=0).astype(np.uint8)
