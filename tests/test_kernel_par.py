"""PAR refinement: Triton kernels (compiled on CUDA, the interpreter on the CPU;
tests/helpers.DEVICE) vs the float64 reference."""
import pytest
import torch

import kernels
from helpers import DEVICE, rel as _rel, tol, force_backend
from kernels import par as par_mod
from kernels import reference

DIL = (1, 2, 4, 8, 12, 24)


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    force_backend(monkeypatch, "triton")


@pytest.fixture(params=["fp32", "bf16"])
def storage(request):
    """The affinity stored in fp32 (the default, the published refinement) and in bf16."""
    return request.param


TOL = tol("par", torch.float32)


def _inputs(b, ci, c, h, w, dtype):
    image = (torch.rand(b, ci, h, w, dtype=torch.float64) * 255).to(dtype)
    masks = torch.randn(b, c, h, w, dtype=torch.float64).softmax(1).to(dtype)
    return image.to(DEVICE), masks.to(DEVICE)


def _ref(image, masks, dilations, num_iter, storage="fp32"):
    """The float64 oracle of the kernels. fp32 storage: the reference refinement. bf16 storage: the
    float64 propagation of the very weights the affinity kernel stored (its bf16 rounding of an fp32
    value is deliberate, bounded by test_affinity_rounding_bound; on a GPU the fp32 value comes
    through approximate exp / div / sqrt, and a reference rounded on its own would land on the
    other side of a bf16 rounding boundary now and then, 2^-8 away)."""
    if storage == "fp32":
        return reference.par_refine(image.double(), masks.double(), dilations, num_iter, "fp32")
    aff = par_mod.par_affinity_triton(image, dilations, torch.bfloat16).double()
    m = masks.double()
    for _ in range(num_iter):
        m = (aff[:, None] * reference._neighbours(m, reference.par_offsets(dilations))).sum(2)
    return m


def test_dispatch_is_triton():
    assert kernels.resolve_backend("par_refine", DEVICE) == "triton"


@pytest.mark.parametrize("dilations", [DIL, (1, 3, 40)])
def test_affinity_matches_reference(dilations):
    image, _ = _inputs(2, 3, 1, 13, 17, torch.float32)
    aff = par_mod.par_affinity_triton(image, dilations)
    ref = reference.par_affinity(image.double(), dilations)
    assert aff.shape == ref.shape == (2, 8 * len(dilations), 13, 17)
    assert _rel(aff, ref) <= TOL
    # bf16 storage is the fp32 result rounded to nearest even, bit for bit (the interpreter's own
    # cast truncates; the kernel rounds by integer arithmetic so every backend stores these bits)
    assert torch.equal(par_mod.par_affinity_triton(image, dilations, torch.bfloat16), aff.to(torch.bfloat16))


@pytest.mark.parametrize("num_iter", [1, 10])
def test_affinity_rounding_bound(storage, num_iter):
    """Stored weights are w (1 + d), |d| <= u (u = 2^-8 for bf16, 2^-24 for fp32); weights and masks
    are >= 0, so n iterations stay within (1 +- u)^n of the exact refinement, elementwise, up to the
    fp32 arithmetic: J-term sums and the weights' own evaluation, (J + 8) 2^-24 per iteration."""
    image, masks = _inputs(2, 3, 5, 13, 17, torch.float32)
    out = kernels.par_refine(image, masks, DIL, num_iter, affinity_storage=storage).double()
    exact = reference.par_refine(image.double(), masks.double(), DIL, num_iter, "fp32")
    u = 2.0**-8 if storage == "bf16" else 2.0**-24
    bound = (1 + u) ** num_iter - 1 + num_iter * (8 * len(DIL) + 8) * 2.0**-24
    assert (out / exact - 1).abs().max().item() <= bound


def test_affinity_storage_rejects_unknown():
    with pytest.raises(ValueError, match="^affinity_storage: expected one of"):
        kernels.par_refine(*_inputs(1, 3, 2, 5, 6, torch.float32), DIL, 1, affinity_storage="fp16")


def test_reference_bf16_storage_rounds_the_weights():
    """The reference's bf16 option is the fp32 refinement with its weights rounded to nearest even."""
    image, masks = _inputs(1, 3, 3, 9, 11, torch.float32)
    image, masks = image.cpu().double(), masks.cpu().double()
    aff = reference.par_affinity(image, DIL).to(torch.bfloat16).double()
    m = masks
    for _ in range(3):
        m = (aff[:, None] * reference._neighbours(m, reference.par_offsets(DIL))).sum(2)
    rounded = reference.par_refine(image, masks, DIL, 3, affinity_storage="bf16")
    assert _rel(rounded, m) <= 1e-14  # float64, another summation order
    assert _rel(reference.par_refine(image, masks, DIL, 3, "fp32"), m) > 1e-4  # the rounding did happen


@pytest.mark.parametrize(
    "b, ci, c, h, w, dilations, num_iter, dtype",
    [
        (2, 3, 5, 13, 17, DIL, 10, torch.float32),  # dilations 12, 24 exceed the 13-row image
        (1, 3, 1, 13, 17, (1, 3, 40), 1, torch.float32),  # C = 1, a dilation beyond both sides
        (2, 3, 3, 9, 11, (1, 2), 0, torch.float32),  # no iteration: the masks in fp32
        (2, 3, 21, 7, 19, (2,), 3, torch.float32),  # C > the channel block, one dilation
        (1, 1, 4, 11, 9, DIL, 2, torch.float32),  # a grayscale image
        (2, 3, 6, 13, 17, DIL, 10, torch.float16),
        (1, 3, 4, 13, 17, DIL, 2, torch.bfloat16),
        (1, 3, 4, 13, 17, DIL, 2, torch.float64),
    ],
)
def test_par_refine_matches_reference(b, ci, c, h, w, dilations, num_iter, dtype, storage):
    image, masks = _inputs(b, ci, c, h, w, dtype)
    out = kernels.par_refine(image, masks, dilations, num_iter, affinity_storage=storage)
    assert out.dtype == torch.float32 and out.shape == masks.shape
    # inputs are identical for both sides and the output is fp32: fp32-level agreement
    # holds for every input dtype, tighter than the 1e-2 allowed for fp16
    assert _rel(out, _ref(image, masks, dilations, num_iter, storage)) <= TOL


def test_two_mask_sets_concatenated_equal_separate_calls(storage):
    image, m1 = _inputs(2, 3, 3, 13, 17, torch.float32)
    m2 = torch.randn(2, 3, 13, 17).softmax(1).to(DEVICE)
    both = kernels.par_refine(image, torch.cat([m1, m2], dim=1), DIL, 4, affinity_storage=storage)
    one = kernels.par_refine(image, m1, DIL, 4, affinity_storage=storage)
    two = kernels.par_refine(image, m2, DIL, 4, affinity_storage=storage)
    assert torch.equal(both, torch.cat([one, two], dim=1))
    assert _rel(both, _ref(image, torch.cat([m1, m2], dim=1), DIL, 4, storage)) <= TOL


def test_strided_inputs_and_no_grad(storage):
    """Non-contiguous image and masks are read through their strides; outputs carry no grad."""
    image, masks = _inputs(2, 3, 10, 13, 17, torch.float32)
    image = image.to(memory_format=torch.channels_last).requires_grad_()
    masks = masks[:, ::2].transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided
    assert not masks.is_contiguous() and not image.is_contiguous()
    out = kernels.par_refine(image, masks, (1, 5), 2, affinity_storage=storage)
    assert not out.requires_grad
    assert _rel(out, _ref(image.detach(), masks.detach(), (1, 5), 2, storage)) <= TOL


def test_compile_fullgraph(storage):
    image, masks = _inputs(1, 3, 2, 9, 13, torch.float32)

    @torch.compile(fullgraph=True)
    def refine(img, m):
        return kernels.par_refine(img, m, [1, 2, 20], 2, affinity_storage=storage) * 2.0

    out = refine(image, masks)
    assert _rel(out, 2.0 * _ref(image, masks, (1, 2, 20), 2, storage)) <= TOL


def test_default_matches_the_published_refinement():
    """The default (fp32 affinity storage) against the published module's own formulation (replicate
    pad + one-hot dilated convs, tests/test_reference.py) at the training step's settings: the six
    dilations, ten iterations, two background-threshold sets of softmaxed maps."""
    from test_reference import _par_conv

    gen = torch.Generator().manual_seed(5)
    image = (torch.rand(2, 3, 15, 18, generator=gen, dtype=torch.float64) * 255).round()
    masks = torch.randn(2, 6, 15, 18, generator=gen, dtype=torch.float64).mul(2).softmax(1)
    out = kernels.par_refine(image.float().to(DEVICE), masks.float().to(DEVICE))
    assert _rel(out, _par_conv(image, masks, DIL, 10).to(DEVICE)) <= 1e-4


@pytest.mark.gpu
def test_gpu_neighbour_offsets_past_int32():
    """J * H * W >= 2^31 (9 dilations, 72 neighbours, 5504 x 5504 pixels): the step kernel's offset
    of neighbour j's weights, j * H * W, needs int64. PAR's result at a pixel depends only on the
    pixels within its dilations, so the bottom strip of the image, refined alone, is the oracle of
    the last rows (one iteration)."""
    dil = (1, 2, 3, 4, 5, 6, 7, 8, 9)
    side = 5504
    assert 8 * len(dil) * side * side >= 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    image = torch.rand(1, 3, side, side, generator=gen, device="cuda") * 255
    masks = torch.rand(1, 1, side, side, generator=gen, device="cuda")
    out = kernels.par_refine(image, masks, dil, 1)
    strip = 4 * max(dil)  # rows the last max(dil) output rows depend on, and their neighbours
    want = reference.par_refine(image[..., -strip:, :].double(), masks[..., -strip:, :].double(), dil, 1, "fp32")
    assert _rel(out[..., -max(dil):, :], want[..., -max(dil):, :]) <= TOL
