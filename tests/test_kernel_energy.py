"""Dense CRF energy: the Triton kernels (under the interpreter here) vs the float64 reference.

Accuracy contract of the pairs kernel (fp16 W and S in the second dot, the exponent from a split
fp16 dot): E within 1e-3 relative, the gradient's cosine >= 0.9999 and its norm within 1e-3 of
the float64 brute force. The interpreter rounds W and S to fp16 exactly as the GPU does; what it
does not reproduce (ex2.approx, the tensor core's fp32 accumulation) is bounded in
docs/PERF.md, "Dense energy loss: predicted time", and by test_split_exponent_error below.
"""
import math
from unittest import mock

import pytest
import torch

import kernels
from helpers import DEVICE, force_backend
from kernels import energy as k_energy
from kernels import reference

LOSS_TOL = 1e-3
COS_MIN = 0.9999
NORM_TOL = 1e-3


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    force_backend(monkeypatch, "triton")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(b, c, h, w, dtype, ci=3, seed=0):
    """Pixels 0..255 (integers, as the nearest-downscaled crop feeds them), softmax probabilities
    and the training step's gate: 1 where the pseudo label is uncertain (~30 %), 1 - max prob
    elsewhere, zero outside the crop (a band)."""
    gen = torch.Generator().manual_seed(seed)
    image = (torch.rand(b, ci, h, w, generator=gen, dtype=torch.float64) * 255).round().to(dtype)
    logits = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).mul(3)
    probs = logits.softmax(1)
    uncertain = torch.rand(b, h, w, generator=gen, dtype=torch.float64) < 0.3
    gate = torch.where(uncertain, 1.0, (1 - probs.amax(1)).clamp_min(0))
    gate[0, : h // 3] = 0
    gate[-1, :, -2:] = 0
    # drawn on the CPU (the same numbers on both devices), run where the kernels compile or interpret
    return image.to(DEVICE), probs.to(dtype).to(DEVICE), gate.to(dtype).to(DEVICE)


def _reference(image, probs, gate, sigma_rgb, sigma_xy):
    p = probs.detach().double().requires_grad_()
    loss = reference.dense_energy_loss(image.double(), p, gate.double(), sigma_rgb, sigma_xy)
    loss.backward()
    return loss.detach(), p.grad


def _fused(image, probs, gate, sigma_rgb, sigma_xy):
    p = probs.detach().clone().requires_grad_()
    loss = kernels.dense_energy_loss(image, p, gate, sigma_rgb, sigma_xy)
    loss.backward()
    return loss.detach(), p.grad


def _assert_accurate(loss, grad, ref_loss, ref_grad):
    g, r = grad.double().flatten(), ref_grad.double().flatten()
    # a bf16 gradient is itself only 8 bits: the interpreter truncates fp32 -> bf16 (a -2^-9 bias
    # of the norm; the GPU rounds to nearest), so its norm gets bf16's eps
    norm_tol = torch.finfo(torch.bfloat16).eps if grad.dtype == torch.bfloat16 else NORM_TOL
    assert _rel(loss, ref_loss) <= LOSS_TOL
    assert torch.dot(g, r) / (g.norm() * r.norm()) >= COS_MIN
    assert abs(g.norm() / r.norm() - 1) <= norm_tol


def _block(n):
    patches = mock.patch.multiple(k_energy, _BLOCK_P=n, _BLOCK_Q=n)
    return patches


def test_dispatch_is_triton():
    assert kernels.resolve_backend("dense_energy_loss", DEVICE) == "triton"


@pytest.mark.parametrize(
    "b, c, h, w, dtype, sigma_rgb, sigma_xy",
    [
        (2, 5, 13, 17, torch.float32, 15.0, 50.0),  # the published sigmas
        (1, 1, 24, 20, torch.float32, 15.0, 10.0),  # C = 1, HW = 480 (not a tile multiple)
        (2, 21, 13, 17, torch.float32, 4.0, 1.5),  # narrow kernel, W nearly diagonal: the direct kernel
        (1, 40, 9, 11, torch.float32, 4.0, 1.5),  # the direct kernel over two channel blocks (32)
        (2, 21, 13, 17, torch.float32, 15.0, 1.5),  # narrow in xy on the split kernel
        (1, 130, 7, 9, torch.float32, 15.0, 5.0),  # C above one channel block (128)
        (2, 21, 13, 17, torch.float16, 15.0, 10.0),
        (1, 4, 11, 13, torch.bfloat16, 15.0, 10.0),
        (1, 3, 11, 13, torch.float64, 15.0, 10.0),
        (1, 2, 1, 3, torch.float32, 15.0, 50.0),  # one row, one pixel with a gate
    ],
)
def test_energy_value_and_gradient(b, c, h, w, dtype, sigma_rgb, sigma_xy):
    image, probs, gate = _inputs(b, c, h, w, dtype)
    loss, grad = _fused(image, probs, gate, sigma_rgb, sigma_xy)
    ref_loss, ref_grad = _reference(image, probs, gate, sigma_rgb, sigma_xy)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == probs.dtype and grad.shape == probs.shape
    _assert_accurate(loss, grad, ref_loss, ref_grad)


@pytest.mark.parametrize("c", [21, 81])
@pytest.mark.parametrize("size, sigma_xy, dtype", [(40, 50.0, torch.float32), (32, 6.0, torch.float16)])
def test_energy_at_the_voc_and_coco_channel_counts(c, size, sigma_xy, dtype):
    """The production channel counts (VOC 21: symmetric 128-pixel tiles; COCO 81: 64-pixel tiles
    from both sides) on the largest images the interpreter runs in seconds."""
    image, probs, gate = _inputs(2, c, size, size, dtype, seed=c)
    loss, grad = _fused(image, probs, gate, 15.0, sigma_xy)
    _assert_accurate(loss, grad, *_reference(image, probs, gate, 15.0, sigma_xy))


@pytest.mark.parametrize("block, h, w", [(16, 12, 12), (16, 7, 9), (32, 9, 15)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_energy_many_tiles_both_modes(block, h, w, deterministic):
    """Small tiles give n = 9 (odd), 4 (even, padded) and 5 (odd, padded) tiles: the circulant
    half with its d = n / 2 rule, the padding, and the deterministic mode that evaluates every
    tile pair."""
    image, probs, gate = _inputs(2, 7, h, w, torch.float32, seed=block + h)
    with _block(block):
        if deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            loss, grad = _fused(image, probs, gate, 15.0, 4.0)
        finally:
            torch.use_deterministic_algorithms(False)
    _assert_accurate(loss, grad, *_reference(image, probs, gate, 15.0, 4.0))


def test_even_tile_count_pairs_each_tile_pair_once():
    """n = 4 tiles of 16: the d = n / 2 pairs belong to the first half of the programs only, so W S
    equals the reference's (twice-counted pairs would add W_ij S_j again)."""
    image, probs, gate = _inputs(1, 3, 8, 8, torch.float32, seed=3)
    gate = torch.ones_like(gate)
    with _block(16):
        loss, grad = _fused(image, probs, gate, 40.0, 20.0)
    _assert_accurate(loss, grad, *_reference(image, probs, gate, 40.0, 20.0))


def test_deterministic_mode_is_bitwise_reproducible():
    image, probs, gate = _inputs(1, 5, 9, 15, torch.float32, seed=5)
    with _block(16):
        torch.use_deterministic_algorithms(True)
        try:
            runs = [_fused(image, probs, gate, 15.0, 4.0) for _ in range(2)]
        finally:
            torch.use_deterministic_algorithms(False)
        sym = _fused(image, probs, gate, 15.0, 4.0)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert _rel(sym[0], runs[0][0]) <= 1e-5 and _rel(sym[1], runs[0][1]) <= 1e-5


@pytest.mark.parametrize("sigma_rgb", [0.05, 5.0])
def test_small_sigma_runs_the_direct_kernel(sigma_rgb):
    """sigma_rgb = 0.05 puts |f|^2 / 2 far beyond what the split fp16 dot resolves (and beyond fp16),
    5 beyond its bound for 0..255: the direct kernel (fp32 differences) runs, at fp32 accuracy."""
    image, probs, gate = _inputs(1, 3, 9, 11, torch.float32, seed=7)
    assert k_energy._half_norm_bound(9, 11, 3, sigma_rgb, 10.0) > k_energy._MAX_HALF_NORM
    with mock.patch.object(k_energy, "_energy_pairs_kernel", None):  # not launched
        loss, grad = _fused(image, probs, gate, sigma_rgb, 10.0)
    ref_loss, ref_grad = _reference(image, probs, gate, sigma_rgb, 10.0)
    assert _rel(loss, ref_loss) <= 1e-5 and _rel(grad, ref_grad) <= 1e-5


def test_production_sigmas_run_the_split_kernel_and_bound_the_features():
    """sigma_rgb = 15, sigma_xy = 50 at 224 x 224 stays on the split kernel; the bound holds for
    any 0..255 image (here the extreme one: black and white halves in opposite corners)."""
    bound = k_energy._half_norm_bound(224, 224, 3, 15.0, 50.0)
    assert bound <= k_energy._MAX_HALF_NORM
    image = torch.zeros(1, 3, 224, 224, dtype=torch.float64)
    image[..., :112, :112] = 255
    assert float(k_energy._split_features(image, 15.0, 50.0, 224 * 224, 32)[2]) <= bound


_BEYOND_RANGE = """
import torch, kernels
image = torch.rand(1, 3, 9, 11, device="cuda") * 255000
probs = torch.rand(1, 3, 9, 11, device="cuda").softmax(1)
gate = torch.ones(1, 9, 11, device="cuda")
with kernels.use_backend("triton"):
    kernels.dense_energy_loss(image, probs, gate, 15.0, 10.0)
torch.cuda.synchronize()
"""


def test_image_beyond_the_pixel_range_fails_the_device_check():
    if DEVICE.type == "cuda":  # a device-side assert poisons the CUDA context: check it in a child
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-c", _BEYOND_RANGE], capture_output=True, text=True, timeout=300)
        # torch._assert_async's message reaches stderr on the CPU; CUDA reports a device-side assert
        assert proc.returncode != 0 and ("0..255" in proc.stderr or "device-side assert" in proc.stderr), \
            proc.stderr[-2000:]
        return
    image, probs, gate = _inputs(1, 3, 9, 11, torch.float32, seed=8)
    with pytest.raises(RuntimeError, match="0..255"):
        kernels.dense_energy_loss(image * 1000, probs, gate, 15.0, 10.0)


@pytest.mark.parametrize("pattern", ["uniform", "stripes"])
def test_split_exponent_error(pattern):
    """The split features of a 224 x 224 image (0..255, the production sigmas): F . G with exact
    products (what the tensor core multiplies) against -|f_p - f_q|^2 / 2 log2 e in float64, on
    random, near and equal pixel pairs: below 1e-4 wherever W is above 2^-30."""
    h = w = 224
    gen = torch.Generator().manual_seed(11)
    if pattern == "uniform":
        image = (torch.rand(1, 3, h, w, generator=gen, dtype=torch.float64) * 255).round()
    else:  # black and white rows: the largest |f|^2 / 2 after centring
        image = torch.zeros(1, 3, h, w, dtype=torch.float64)
        image[..., ::2, :] = 255
    feat_f, feat_g, half_norm = k_energy._split_features(image, 15.0, 50.0, h * w, 32)
    assert 100 < float(half_norm) < k_energy._MAX_HALF_NORM
    n = 100_000
    p = torch.randint(0, h * w, (n,), generator=gen)
    q = torch.randint(0, h * w, (n,), generator=gen)
    q[: n // 2] = (p[: n // 2] + torch.randint(-3, 4, (n // 2,), generator=gen)).clamp(0, h * w - 1)
    q[:1000] = p[:1000]
    got = (feat_f[0, p].double() * feat_g[0, q].double()).sum(-1)
    pix = torch.arange(h * w, dtype=torch.float64)
    f = torch.cat((torch.stack((pix.div(w, rounding_mode="floor"), pix % w), -1) / 50.0,
                   image[0].reshape(3, -1).T / 15.0), -1)
    exact = -0.5 * (f[p] - f[q]).square().sum(-1) * math.log2(math.e)
    keep = exact > -30
    assert keep.sum() > n // 10
    assert (got - exact)[keep].abs().max() < 1e-4


def test_aot_configs_are_the_launch_configs():
    """aot_configs describes what the launcher runs: symmetric 128-pixel tiles at VOC, two-sided
    64 x 128 tiles of 64 + 32 channels at COCO (and in the deterministic mode), the direct
    fallback and the backward, every constexpr and argument of the kernel named, the integer
    arguments at their launch values (n_tiles: 392 row tiles at 224 x 224 of 128, 784 of 64)."""
    from kernels._launch import AotCase

    for c, symmetric, block, c_total, n_tiles in ((21, True, 128, 32, 392), (81, False, 64, 96, 784)):
        for cc in (80, 90):
            kcs = {kc.name: kc for kc in k_energy.aot_configs(AotCase("x", C=c, cc=cc))}
            assert set(kcs) == ({"energy_pairs", "energy_pairs_det"} if symmetric else {"energy_pairs"}) | {
                "energy_direct", "energy_bwd"}
            for name, deterministic in (("energy_pairs", False), ("energy_pairs_det", True)):
                cfg = k_energy._pairs_config(c, 3, deterministic)
                fwd = kcs.get(name, kcs["energy_pairs"])
                assert fwd.constexprs == {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                assert (fwd.num_warps, fwd.num_stages) == (cfg["num_warps"], cfg["num_stages"])
                assert k_energy._pairs_grid(224 * 224, cfg)[1] == (n_tiles if not deterministic else 784)
            fwd = kcs["energy_pairs"]
            assert (fwd.constexprs["SYMMETRIC"], fwd.constexprs["BLOCK"], fwd.constexprs["C_TOTAL"]) == (
                symmetric, block, c_total)
            names = list(fwd.fn.arg_names)
            assert list(fwd.signature) == names
            # pointers 16-byte aligned; n_tiles divisible by 16 exactly when the launch value is
            div16 = {names[i[0]] for i in fwd.attrs}
            assert div16 == {"f_ptr", "g_ptr", "s_ptr", "row_ptr", "col_ptr"} | ({"n_tiles"} if n_tiles % 16 == 0
                                                                               else set())
            direct = kcs["energy_direct"]
            assert direct.constexprs["BLOCK_C"] == k_energy._direct_config(c)["BLOCK_C"]
            assert direct.num_warps == k_energy._direct_config(c)["num_warps"]
            for kc in kcs.values():
                assert set(kc.signature) == set(kc.fn.arg_names)


def test_strided_inputs_other_channel_count_and_no_grad_for_image_gate():
    """Channels-last / sliced inputs through strides, a 1-channel image; image, gate get None."""
    image, probs, gate = _inputs(2, 8, 13, 17, torch.float32, ci=1)
    image = image.to(memory_format=torch.channels_last).requires_grad_()
    probs = probs.to(memory_format=torch.channels_last)[:, 1:6]
    gate = gate.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not probs.is_contiguous() and not gate.is_contiguous()
    p = probs.detach().requires_grad_()
    loss = kernels.dense_energy_loss(image, p, gate, 15.0, 10.0)
    loss.backward()
    assert image.grad is None and gate.grad is None
    _assert_accurate(loss, p.grad, *_reference(image.detach(), probs, gate.detach(), 15.0, 10.0))


def test_upstream_gradient_scales():
    image, probs, gate = _inputs(1, 3, 9, 11, torch.float32)
    p = probs.clone().requires_grad_()
    loss = kernels.dense_energy_loss(image, p, gate, 15.0, 10.0)
    (3.5 * loss).backward()
    ref_loss, ref_grad = _reference(image, probs, gate, 15.0, 10.0)
    _assert_accurate(loss, p.grad, ref_loss, 3.5 * ref_grad)


def test_gradient_is_minus_two_as_over_b():
    image, probs, gate = _inputs(2, 4, 9, 11, torch.float32, seed=9)
    p = probs.clone().requires_grad_()
    loss, as_ = k_energy._energy_op(image, p, gate, 15.0, 10.0)
    loss.backward()
    assert torch.equal(p.grad, -2.0 / 2 * as_)
    assert torch.allclose(loss.double(), -(probs.double() * as_.double()).sum() / 2, rtol=1e-6)


def test_compile_fullgraph_forward_backward():
    image, probs, gate = _inputs(2, 3, 9, 13, torch.float32)

    @torch.compile(fullgraph=True)
    def step(img, s, g):
        return 1e-7 * kernels.dense_energy_loss(img, s.softmax(1), g, 15.0, 10.0)

    logits = probs.log().clone().requires_grad_()
    loss = step(image, logits, gate)
    loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = 1e-7 * reference.dense_energy_loss(image.double(), ref_logits.softmax(1), gate.double(), 15.0, 10.0)
    ref.backward()
    _assert_accurate(loss, logits.grad, ref, ref_logits.grad)


# --------------------------------------------------------------------------------------------
# GPU only: the compiled kernels (ex2.approx, the tensor cores' fp32 accumulation, the atomics)
# --------------------------------------------------------------------------------------------
def _cuda_inputs(b, c, size, seed):
    return [t.cuda() for t in _inputs(b, c, size, size, torch.float32, seed=seed)]


@pytest.mark.gpu
@pytest.mark.parametrize("c", [21, 81])
@pytest.mark.parametrize("size, sigma_xy", [(96, 50.0), (64, 8.0)])
def test_gpu_matches_float64_brute_force(c, size, sigma_xy):
    image, probs, gate = _cuda_inputs(2, c, size, seed=c + size)
    loss, grad = _fused(image, probs, gate, 15.0, sigma_xy)
    _assert_accurate(loss, grad, *_reference(image, probs, gate, 15.0, sigma_xy))


@pytest.mark.gpu
@pytest.mark.parametrize("c", [21, 81])
def test_gpu_modes_agree_deterministic_is_reproducible_and_memory_is_linear(c):
    """At the production size: the deterministic mode is bitwise reproducible, the default
    (atomics) agrees with it to fp32 rounding, and the extra memory is far below one HW x HW fp32
    plane per image."""
    b, size = 4, 224
    image, probs, gate = _cuda_inputs(b, c, size, seed=c)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    default = _fused(image, probs, gate, 15.0, 50.0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 64 * b * c * size * size * 4, f"peak extra memory {peak} bytes"
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_fused(image, probs, gate, 15.0, 50.0) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert _rel(default[0], runs[0][0]) <= 1e-5 and _rel(default[1], runs[0][1]) <= 1e-5
