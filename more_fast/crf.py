"""Dense CRF post-processing (docs/METHOD.md, Evaluation), through the optional `pydensecrf2` package.

The published protocols end with a fully connected CRF (Krähenbühl & Koltun) of 10 mean-field
iterations, a Gaussian kernel (xy std 1, weight 3) and a bilateral kernel (xy std 67, rgb std 3,
weight 4), run on the image at its original resolution. `pydensecrf2` (a maintained build of
pydensecrf, the package the published code uses) builds from source on PyPI and is NOT a
dependency of more_fast: `pip install pydensecrf2` (needs a C++ compiler) to use `--crf`.
It runs on the CPU, one image at a time: measured 3.5 s (3 labels) and 5.7 s (21 labels) for a
500 x 375 image, 10 iterations, on one core of a heavily loaded 2-core machine (less on an idle
core); scripts/evaluate.py --crf-workers N spreads the images over N processes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

CRF_PARAMS = dict(iters=10, pos_xy=1.0, pos_w=3.0, bi_xy=67.0, bi_rgb=3.0, bi_w=4.0)
INSTALL_HINT = "pip install pydensecrf2 (an optional dependency, built from source: needs a C++ compiler)"


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def require_crf() -> None:
    if not crf_available():
        raise RuntimeError(f"--crf needs the dense-CRF package: {INSTALL_HINT}")


def dense_crf(image: np.ndarray, probs: np.ndarray, iters: int = 10, pos_xy: float = 1.0, pos_w: float = 3.0,
              bi_xy: float = 67.0, bi_rgb: float = 3.0, bi_w: float = 4.0) -> np.ndarray:
    """Mean-field dense CRF. image H x W x 3 uint8, probs C x H x W (scores in [0, 1]; unary
    -log(clip(p, 1e-5))) -> C x H x W float32 marginals. C = 1 is returned as it is."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
    c, h, w = probs.shape
    if (h, w) != image.shape[:2]:
        raise ValueError(f"probs: {probs.shape} does not match the image {image.shape[:2]}")
    if c == 1:
        return probs.astype(np.float32)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(image), compat=bi_w)
    return np.asarray(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def crf_map_labels(image: np.ndarray, maps: np.ndarray, present: np.ndarray,
                   params: Optional[dict] = None) -> np.ndarray:
    """The published LAM/CAM + CRF label map: scores [1 - max_c map_c | maps of the present
    classes] -> CRF -> argmax -> class ids (0 background, c + 1 class c). maps K x H x W in [0, 1],
    present K bool. No present class: all background."""
    keys = np.flatnonzero(present)
    h, w = maps.shape[1:]
    if keys.size == 0:
        return np.zeros((h, w), dtype=np.uint8)
    valid = maps[keys]
    scores = np.concatenate([1.0 - valid.max(axis=0, keepdims=True), valid], axis=0)
    q = dense_crf(image, scores, **(params or CRF_PARAMS))
    ids = np.concatenate([[0], keys + 1])
    return ids[q.argmax(axis=0)].astype(np.uint8)


def crf_prob_labels(image: np.ndarray, probs: np.ndarray, params: Optional[dict] = None) -> np.ndarray:
    """Decoder + CRF: softmax probabilities (K+1) x H x W -> CRF -> argmax."""
    return dense_crf(image, probs, **(params or CRF_PARAMS)).argmax(axis=0).astype(np.uint8)
