"""Dense CRF: the lattice (more_fast.lattice) against its plain loop reference
(more_fast.lattice_reference, the C++ transcribed) and against pydensecrf itself, on real
photographs (scikit-image's astronaut, chelsea, coffee) with unaries from a blurred noisy map.

Measured (the published settings, 21 labels, 10 iterations, full-size photographs): the same
label at 100% of the pixels; marginals within 3.2e-5 of pydensecrf's (the lattice is pydensecrf's
point for point; the filter's sums run in another order, last-bit differences that the mean field
carries). The bounds below: labels >= 99.5% (the issue's) and >= 99.9%; marginals 1e-4;
filtered values (recovered from one iteration) 1e-4; lattice vs its reference: construction
bit-equal, the CSR filter within 1e-6 relative, the gather filter bit-equal on the CPU.

The pydensecrf comparisons skip only where pydensecrf is not importable (it is an optional
dependency, part of the `dev` extra).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from more_fast import crf as crf_mod
from more_fast import lattice as L
from more_fast import lattice_reference as R
from more_fast.crf import CRF_PARAMS, crf_map_labels, crf_prob_labels, dense_crf, dense_crf_images

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the dev extra) ships the photographs")
HAVE_PYDENSECRF = crf_mod.crf_available("pydensecrf")
needs_pydensecrf = pytest.mark.skipif(not HAVE_PYDENSECRF, reason="pydensecrf (optional dependency) is not importable")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def photo(name: str, size=None) -> np.ndarray:
    img = getattr(skimage_data, name)()[..., :3]
    if size is not None:  # area-average downscale, uint8 RGB
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        img = F.interpolate(t, size=size, mode="area")[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return np.ascontiguousarray(img)


def noisy_probs(img: np.ndarray, c: int, seed: int = 0, noise: float = 1.5, sigma: float = 2.0) -> np.ndarray:
    """C x H x W probabilities: one-hot intensity bins of the photo, plus Gaussian noise, blurred, softmax."""
    rng = np.random.default_rng(seed)
    h, w, _ = img.shape
    lab = np.minimum((img.astype(np.float32).mean(2) / 256 * c).astype(int), c - 1)
    logits = 3 * np.eye(c, dtype=np.float32)[lab].transpose(2, 0, 1) + rng.normal(0, noise, (c, h, w)).astype(np.float32)
    k = 9
    g = torch.exp(-(torch.arange(k, dtype=torch.float32) - k // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    t = F.pad(torch.from_numpy(logits)[:, None], (k // 2,) * 4, mode="replicate")
    t = F.conv2d(F.conv2d(t, g.view(1, 1, 1, k)), g.view(1, 1, k, 1))[:, 0]
    return torch.softmax(t, 0).numpy()


def pydensecrf_crf(img, probs, iters=10, pos_xy=1.0, pos_w=3.0, bi_xy=67.0, bi_rgb=3.0, bi_w=4.0,
                   normalization=None, gaussian=True, bilateral=True):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    norm = dict(normalization=normalization) if normalization is not None else {}
    if gaussian:
        d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w, **norm)
    if bilateral:
        d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(img), compat=bi_w, **norm)
    return np.asarray(d.inference(iters), dtype=np.float32).reshape(c, h, w)


# ---------------------------------------------------------------- lattice vs its reference

@pytest.mark.parametrize("xy,rgb", [(1.0, None), (5.0, 3.0), (67.0, 3.0)], ids=["gaussian", "bilateral5", "bilateral67"])
def test_lattice_is_the_reference_lattice(xy, rgb):
    img = photo("chelsea", (15, 22))
    f_ref = R.reference_features(img, xy, rgb)
    feats = L.pixel_features(torch.from_numpy(img)[None], xy, rgb)
    np.testing.assert_array_equal(feats[0].numpy(), f_ref)
    ref, lat = R.ReferenceLattice(f_ref), L.build_lattice(feats)
    assert lat.num_points == ref.m
    np.testing.assert_array_equal(lat.weights.numpy(), ref.bary)  # bit-equal barycentric weights
    # the same vertices: one lattice point of ours per point of the reference's hash table
    mine = lat.offsets.numpy() - 1
    mapping = np.full(ref.m, -1)
    mapping[ref.offset.reshape(-1)] = mine.reshape(-1)
    assert (mapping >= 0).all() and np.unique(mapping).size == ref.m
    np.testing.assert_array_equal(mapping[ref.offset], mine)
    # the same neighbours along every direction (-1: absent)
    nb = lat.neighbors.numpy() - 1  # (d+1) x 2 x M in our numbering
    want = np.where(ref.neighbors >= 0, mapping[ref.neighbors], -1)  # (d+1) x M_ref x 2
    got = nb[:, :, mapping].transpose(0, 2, 1)
    np.testing.assert_array_equal(got, want)
    v = np.random.default_rng(1).random((f_ref.shape[0], 5)).astype(np.float32)
    for values in (v, v[:, :1].copy(), v[:, :2].copy()):  # SSE path (C > 2) and sequential path (C <= 2)
        want = ref.compute(values)
        np.testing.assert_array_equal(L.lattice_filter_gather(lat, torch.from_numpy(values)).numpy(), want)
        got = L.lattice_filter(lat, torch.from_numpy(values)).numpy()
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
        got_rev = L.lattice_filter(lat, torch.from_numpy(values), reverse=True).numpy()
        want_rev = ref.compute(values, reverse=True)
        assert np.abs(got_rev - want_rev).max() <= 1e-6 * np.abs(want_rev).max()


def test_packed_keys_are_the_vertex_keys_packed():
    img = photo("astronaut", (20, 20))
    rem0, rank, _ = L._locate(L.pixel_features(torch.from_numpy(img)[None], 5.0, 3.0)[0])
    keys = L._vertex_keys(rem0, rank)  # P x 6 x 5, the C++'s loop
    lo = keys.reshape(-1, 5).amin(0) - 20
    strides = torch.tensor([1, 300, 300 ** 2, 300 ** 3, 300 ** 4])
    want = ((keys - lo) * strides).sum(-1)
    got = L._packed_vertex_keys(rem0[:, :5].long() - lo, rank, strides)
    assert torch.equal(got, want)


def test_lattice_batches_images_of_one_size():
    a, b = photo("chelsea", (18, 24)), photo("coffee", (18, 24))
    both = L.build_lattice(L.pixel_features(torch.from_numpy(np.stack([a, b])), 67.0, 3.0))
    v = torch.rand(2 * 18 * 24, 4, generator=torch.Generator().manual_seed(0))
    out = L.lattice_filter(both, v)
    for i, img in enumerate((a, b)):
        alone = L.build_lattice(L.pixel_features(torch.from_numpy(img)[None], 67.0, 3.0))
        part = slice(i * 18 * 24, (i + 1) * 18 * 24)
        torch.testing.assert_close(out[part], L.lattice_filter(alone, v[part]), rtol=1e-6, atol=1e-7)
    probs = np.stack([noisy_probs(a, 4), noisy_probs(b, 4, seed=1)])
    q = dense_crf_images(torch.from_numpy(np.stack([a, b])), torch.from_numpy(probs))
    q_gather = dense_crf_images(torch.from_numpy(np.stack([a, b])), torch.from_numpy(probs), impl="gather")
    torch.testing.assert_close(q_gather, q, rtol=0, atol=1e-6)
    for i, img in enumerate((a, b)):
        torch.testing.assert_close(q[i], torch.from_numpy(dense_crf(img, probs[i], backend="lattice")),
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="^impl:"):
        dense_crf_images(torch.from_numpy(np.stack([a, b])), torch.from_numpy(probs), impl="dense")


@pytest.mark.parametrize("iters", [1, 10])
def test_dense_crf_is_the_reference_mean_field(iters):
    img = photo("astronaut", (14, 14))
    probs = noisy_probs(img, 5)
    want = R.reference_dense_crf(img, probs, iters=iters)
    got = dense_crf(img, probs, iters=iters, backend="lattice")
    assert np.abs(got - want).max() <= 1e-5
    assert (got.argmax(0) == want.argmax(0)).all()


def test_symmetric_normalization_cancels_a_constant_gain(monkeypatch):
    """F = D^-1/2 L D^-1/2 with D = L 1: a lattice scaled by any constant gives the same F; the
    blur's transpose is the blur in the reverse direction order (<u, F v> = <F^T u, v>)."""
    img = photo("coffee", (16, 20))
    feats = L.pixel_features(torch.from_numpy(img)[None], 67.0, 3.0)
    kernel = L.DenseKernel(feats)
    gen = torch.Generator().manual_seed(0)
    u, v = torch.rand(feats.shape[1], 3, generator=gen), torch.rand(feats.shape[1], 3, generator=gen)
    transposed = kernel.norm * L.lattice_filter(kernel.lattice, kernel.norm * u, reverse=True)
    lhs, rhs = (u * kernel.apply(v)).double().sum(), (transposed * v).double().sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * abs(float(lhs))
    assert abs(float(lhs - (kernel.apply(u) * v).double().sum())) > 1e-4 * abs(float(lhs))  # not symmetric itself
    want = kernel.apply(v)
    plain = L.lattice_filter
    assert not torch.allclose(want, plain(kernel.lattice, v), rtol=1e-2)  # the normalization does something
    monkeypatch.setattr(L, "lattice_filter", lambda lat, x, reverse=False: 7.5 * plain(lat, x, reverse))
    scaled = L.DenseKernel(feats)
    torch.testing.assert_close(scaled.apply(v), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- against pydensecrf

@needs_pydensecrf
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("iters", [1, 10])
def test_agreement_with_pydensecrf_on_photographs(name, iters):
    img = photo(name, (150, 200))
    probs = noisy_probs(img, 21)
    want = pydensecrf_crf(img, probs, iters=iters)
    got = dense_crf(img, probs, iters=iters, **{k: v for k, v in CRF_PARAMS.items() if k != "iters"})
    agree = float((got.argmax(0) == want.argmax(0)).mean())
    assert agree >= 0.999, agree  # the issue asks >= 99.5%; measured 100%
    assert np.abs(got - want).max() <= 1e-4


@needs_pydensecrf
def test_agreement_with_pydensecrf_at_full_size():
    """chelsea at its own 300 x 451, 21 labels, the published settings (10 iterations)."""
    img = photo("chelsea")
    probs = noisy_probs(img, 21, seed=3)
    want = pydensecrf_crf(img, probs)
    got = dense_crf(img, probs)
    agree = float((got.argmax(0) == want.argmax(0)).mean())
    assert agree >= 0.995, agree
    assert agree >= 0.999, agree
    assert np.abs(got - want).max() <= 1e-4


def _filtered_by_pydensecrf(img, probs, **kernel):
    """w (F_c - F_0) of one kernel from pydensecrf's first iteration: log Q1 = -U + w F - log Z."""
    q1 = pydensecrf_crf(img, probs, iters=1, **kernel)
    u = -np.log(np.clip(probs, 1e-5, 1.0))
    z = np.log(q1.astype(np.float64)) + u
    return z - z[:1]


@needs_pydensecrf
@pytest.mark.parametrize("which", ["gaussian", "bilateral"])
def test_filtered_values_match_pydensecrf(which):
    """One kernel alone: the lattice's w F(Q0) against the one pydensecrf applies, per label
    (differences to label 0, the log-softmax's constant removed), within 1e-4."""
    img = photo("astronaut", (96, 96))
    probs = noisy_probs(img, 6, noise=0.5)
    flags = dict(gaussian=which == "gaussian", bilateral=which == "bilateral")
    want = _filtered_by_pydensecrf(img, probs, **flags)
    feats = L.pixel_features(torch.from_numpy(img)[None], 1.0) if which == "gaussian" else \
        L.pixel_features(torch.from_numpy(img)[None], 67.0, 3.0)
    weight = 3.0 if which == "gaussian" else 4.0
    unary = -torch.log(torch.from_numpy(probs).clamp(1e-5, 1.0)).reshape(6, -1).T
    got = weight * L.DenseKernel(feats).apply(torch.softmax(-unary, dim=1))
    got = (got - got[:, :1]).T.reshape(6, 96, 96).double().numpy()
    assert np.abs(want).max() > 0.1  # the kernel does something
    assert np.abs(got - want).max() <= 1e-4


@needs_pydensecrf
@pytest.mark.parametrize("alone", ["gaussian", "bilateral"])
def test_one_kernel_alone_matches_pydensecrf(alone):
    img = photo("coffee", (100, 150))
    probs = noisy_probs(img, 8)
    weights = dict(pos_w=3.0, bi_w=0.0) if alone == "gaussian" else dict(pos_w=0.0, bi_w=4.0)
    want = pydensecrf_crf(img, probs, gaussian=alone == "gaussian", bilateral=alone == "bilateral")
    got = dense_crf(img, probs, **weights)
    assert float((got.argmax(0) == want.argmax(0)).mean()) >= 0.999
    assert np.abs(got - want).max() <= 1e-4
    # the other kernel matters: both together is another answer
    both = pydensecrf_crf(img, probs)
    assert np.abs(both - want).max() > 1e-2


@needs_pydensecrf
def test_normalization_is_pydensecrfs_symmetric_one():
    import pydensecrf.densecrf as dcrf

    img = photo("chelsea", (60, 90))
    probs = noisy_probs(img, 4)
    got = dense_crf(img, probs)
    sym = pydensecrf_crf(img, probs, normalization=dcrf.NORMALIZE_SYMMETRIC)
    other = pydensecrf_crf(img, probs, normalization=dcrf.NORMALIZE_BEFORE)
    assert np.abs(got - sym).max() <= 1e-4
    assert np.abs(got - other).max() > 1e-3  # the test tells the normalizations apart


@needs_pydensecrf
def test_two_labels_and_a_one_label_image():
    img = photo("astronaut", (64, 64))
    probs = noisy_probs(img, 2)  # C = 2: pydensecrf's sequential (non-SSE) filter path
    want = pydensecrf_crf(img, probs)
    assert np.abs(dense_crf(img, probs) - want).max() <= 1e-4
    one = probs[:1]  # C = 1: returned as it is, both backends
    for backend in ("lattice", "pydensecrf"):
        np.testing.assert_array_equal(dense_crf(img, one, backend=backend), one)
    # an image whose map is one label everywhere stays that label
    flat = np.full((3, 64, 64), 0.05, dtype=np.float32)
    flat[2] = 0.9
    q = dense_crf(img, flat)
    assert (q.argmax(0) == 2).all()
    assert np.abs(q - pydensecrf_crf(img, flat)).max() <= 1e-4


@needs_pydensecrf
def test_ignore_region_is_filled_from_its_surroundings():
    """A region with no evidence (equal scores, as an ignored region) takes its labels from the
    surroundings through the kernels, as in pydensecrf."""
    img = photo("chelsea", (80, 120))
    probs = noisy_probs(img, 5, noise=0.5)
    probs[:, 20:60, 30:90] = 1.0 / 5
    want = pydensecrf_crf(img, probs)
    got = dense_crf(img, probs)
    assert float((got.argmax(0) == want.argmax(0)).mean()) >= 0.999
    assert np.abs(got - want).max() <= 1e-4
    inside = got[:, 20:60, 30:90]
    assert inside.max(0).min() > 1.0 / 5 + 1e-3  # no longer uniform
    assert np.unique(inside.argmax(0)).size > 1  # and not one label everywhere


@needs_pydensecrf
@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (5, 1), (2, 3)])
def test_tiny_images_match_pydensecrf(h, w):
    rng = np.random.default_rng(h * 10 + w)
    img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    probs = rng.random((3, h, w)).astype(np.float32)
    assert np.abs(dense_crf(img, probs) - pydensecrf_crf(img, probs)).max() <= 1e-5


# ---------------------------------------------------------------- the API

def test_numpy_in_numpy_out_tensor_in_tensor_out():
    img = photo("coffee", (20, 30))
    probs = noisy_probs(img, 3)
    q = dense_crf(img, probs, backend="lattice")
    assert isinstance(q, np.ndarray) and q.shape == probs.shape and q.dtype == np.float32
    qt = dense_crf(torch.from_numpy(img).to(DEVICE), torch.from_numpy(probs).to(DEVICE))
    assert isinstance(qt, torch.Tensor) and qt.device.type == DEVICE.type
    np.testing.assert_allclose(qt.cpu().numpy(), q, atol=1e-5)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert dense_crf(img, probs, iters=0).argmax(0).tolist() == probs.argmax(0).tolist()


def test_label_helpers_agree_for_numpy_and_tensors():
    img = photo("astronaut", (24, 24))
    probs = noisy_probs(img, 4)
    maps = probs[1:] / probs[1:].max(axis=(1, 2), keepdims=True)
    present = np.array([True, False, True])
    lab = crf_map_labels(img, maps, present)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 3}
    lab_t = crf_map_labels(torch.from_numpy(img), torch.from_numpy(maps), torch.from_numpy(present))
    np.testing.assert_array_equal(lab_t.numpy(), lab)
    assert not crf_map_labels(img, maps, np.zeros(3, bool)).any()
    np.testing.assert_array_equal(crf_prob_labels(img, probs), dense_crf(img, probs).argmax(0))


@pytest.mark.parametrize("kwargs,name", [
    (dict(image=np.zeros((8, 8, 3), np.float32)), "image"),
    (dict(image=np.zeros((8, 8), np.uint8)), "image"),
    (dict(image=np.zeros((8, 8, 4), np.uint8)), "image"),
    (dict(image=np.zeros((8, 9, 3), np.uint8)), "probs"),
    (dict(probs=np.full((3, 8, 8), 1.5, np.float32)), "probs"),
    (dict(probs=np.full((3, 8, 8), -0.2, np.float32)), "probs"),
    (dict(probs=np.full((3, 8, 8), np.nan, np.float32)), "probs"),
    (dict(probs=np.ones((3, 8, 8), np.int64)), "probs"),
    (dict(pos_xy=0.0), "pos_xy"), (dict(bi_xy=-1.0), "bi_xy"), (dict(bi_rgb=0), "bi_rgb"),
    (dict(bi_rgb=float("inf")), "bi_rgb"), (dict(iters=-1), "iters"), (dict(iters=2.5), "iters"),
    (dict(pos_w=float("nan")), "pos_w"), (dict(backend="gpu"), "backend"),
])
def test_bad_input_names_the_argument(kwargs, name):
    args = dict(image=np.zeros((8, 8, 3), np.uint8), probs=np.full((3, 8, 8), 1 / 3, np.float32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        dense_crf(args.pop("image"), args.pop("probs"), **args)


def test_pydensecrf_backend_missing_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert not crf_mod.crf_available("pydensecrf") and crf_mod.crf_available("auto")
    img, probs = np.zeros((8, 8, 3), np.uint8), np.full((3, 8, 8), 1 / 3, np.float32)
    with pytest.raises(RuntimeError, match="pip install pydensecrf2"):
        dense_crf(img, probs, backend="pydensecrf")
    assert dense_crf(img, probs).shape == (3, 8, 8)  # the lattice needs nothing


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["csr", "gather"])
def test_cuda_lattice_matches_the_cpu_and_pydensecrf(impl):
    """On a GPU: the CRF of CUDA tensors (lattice built on the device) against the CPU's and pydensecrf's."""
    img = photo("chelsea")
    probs = noisy_probs(img, 21, seed=5)
    cpu = dense_crf_images(torch.from_numpy(img)[None], torch.from_numpy(probs)[None], impl=impl)[0]
    gpu = dense_crf_images(torch.from_numpy(img)[None].cuda(), torch.from_numpy(probs)[None].cuda(), impl=impl)[0]
    assert gpu.device.type == "cuda"
    assert (gpu.argmax(0).cpu() == cpu.argmax(0)).float().mean() >= 0.999
    assert (gpu.cpu() - cpu).abs().max() <= 1e-4
    if HAVE_PYDENSECRF:
        want = pydensecrf_crf(img, probs)
        assert float((gpu.argmax(0).cpu().numpy() == want.argmax(0)).mean()) >= 0.999
    if impl == "csr":  # deterministic: the same bits twice
        again = dense_crf_images(torch.from_numpy(img)[None].cuda(), torch.from_numpy(probs)[None].cuda())[0]
        assert torch.equal(again, gpu)
