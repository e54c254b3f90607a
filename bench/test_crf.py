"""Dense CRF per image: pydensecrf on the CPU (one image at a time, as published) against the
lattice CRF (more_fast.lattice) on this machine's device, in the same run.

Shape: a VOC-sized image, 500 x 375 (scikit-image's `coffee` photograph resized), 21 labels
(VOC's K + 1), 10 mean-field iterations, the published kernels (Gaussian xy 1 w 3; bilateral
xy 67 rgb 3 w 4). Unaries: a blurred noisy label map's softmax. Rows:

  pydensecrf_cpu   pydensecrf's DenseCRF2D.inference (skips where pydensecrf is not importable)
  lattice          more_fast.crf.dense_crf(backend="lattice") on DEVICE, lattice construction included
  lattice_batch4   four images of that size in one lattice (dense_crf_images); per_image_ms = median / 4
  lattice_gather   one image, the gather/index_add_ filter (dense_crf_images(impl="gather")) instead
                   of the CSR products: which of the two a GPU runs faster

Every row records per_image_ms and voc_val_pass_s: the time of the VOC val CRF pass it implies,
1,449 images x 2 CRFs (LAM and decoder, scripts/evaluate.py --crf), at this shape.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, measure

H, W, C, ITERS = 375, 500, 21, 10
VOC_VAL = 1449


def _inputs(batch: int = 1):
    data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the photograph")
    img = torch.from_numpy(data.coffee()).permute(2, 0, 1)[None].float()
    img = F.interpolate(img, size=(H, W), mode="area")[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    gen = torch.Generator().manual_seed(0)
    lab = torch.from_numpy(np.minimum((img.astype(np.float32).mean(2) / 256 * C).astype(np.int64), C - 1))
    logits = 3 * F.one_hot(lab, C).permute(2, 0, 1).float() + 1.5 * torch.randn(C, H, W, generator=gen)
    logits = F.avg_pool2d(logits[None], 9, stride=1, padding=4, count_include_pad=False)[0]
    probs = torch.softmax(logits, 0).numpy()
    images = np.stack([np.roll(img, 17 * i, axis=1) for i in range(batch)])
    return img, probs, images, np.stack([probs] * batch)


def _record(benchmark, per: int):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        per_image = stats.stats.median / per
        benchmark.extra_info["per_image_ms"] = round(per_image * 1e3, 2)
        benchmark.extra_info["voc_val_pass_s"] = round(per_image * VOC_VAL * 2, 1)


def test_crf_pydensecrf_cpu(benchmark):
    from more_fast.crf import crf_available, dense_crf

    if not crf_available("pydensecrf"):
        pytest.skip("pydensecrf (optional dependency) is not importable")
    img, probs, _, _ = _inputs()
    measure(benchmark, lambda: dense_crf(img, probs, iters=ITERS, backend="pydensecrf"), variant="pydensecrf_cpu",
            pass_="fwd", shape=dict(H=H, W=W, C=C, iters=ITERS), rounds=3, warmup=1)
    benchmark.extra_info["device"] = "cpu"
    _record(benchmark, 1)


def test_crf_lattice(benchmark):
    from more_fast.crf import dense_crf

    img, probs, _, _ = _inputs()
    image_t, probs_t = torch.from_numpy(img).to(DEVICE), torch.from_numpy(probs).to(DEVICE)
    measure(benchmark, lambda: dense_crf(image_t, probs_t, iters=ITERS, backend="lattice"), variant="lattice",
            pass_="fwd", shape=dict(H=H, W=W, C=C, iters=ITERS), rounds=20 if DEVICE.type == "cuda" else 3, warmup=1)
    _record(benchmark, 1)


def test_crf_lattice_batch4(benchmark):
    from more_fast.crf import dense_crf_images

    _, _, images, probs = _inputs(4)
    images_t, probs_t = torch.from_numpy(images).to(DEVICE), torch.from_numpy(probs).to(DEVICE)
    measure(benchmark, lambda: dense_crf_images(images_t, probs_t, iters=ITERS), variant="lattice_batch4",
            pass_="fwd", shape=dict(B=4, H=H, W=W, C=C, iters=ITERS), rounds=10 if DEVICE.type == "cuda" else 2,
            warmup=1)
    _record(benchmark, 4)


def test_crf_lattice_gather(benchmark):
    from more_fast.crf import dense_crf_images

    _, _, images, probs = _inputs(1)
    images_t, probs_t = torch.from_numpy(images).to(DEVICE), torch.from_numpy(probs).to(DEVICE)
    measure(benchmark, lambda: dense_crf_images(images_t, probs_t, iters=ITERS, impl="gather"),
            variant="lattice_gather", pass_="fwd", shape=dict(H=H, W=W, C=C, iters=ITERS),
            rounds=20 if DEVICE.type == "cuda" else 3, warmup=1)
    _record(benchmark, 1)
