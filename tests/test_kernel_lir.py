"""Fused L_cre (kernels/lir.py) against the float64 reference, on tests/helpers.DEVICE
(compiled on CUDA, the Triton interpreter on the CPU).

Relative error ||fused - ref|| / ||ref|| within tol("lir", dtype) (tests/helpers.py), for
the loss and the gradient of the class tokens (the patch tokens are detached: no gradient).
The `small_blocks` cases shrink the tiles so that K and N span several blocks, partial blocks
and several chunks of the statistics merge.
"""
import pytest
import torch

import kernels
from helpers import on_device, rel, tol as tolerance, force_backend
from kernels import lir, reference


@pytest.fixture
def triton_backend(monkeypatch):
    force_backend(monkeypatch, "triton")
    assert kernels.triton_available("lir_loss")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 classes, 16 patches, 16 channels; statistics merged 2 tiles at a time."""
    monkeypatch.setattr(
        lir, "_config",
        lambda dev, k, n, d: dict(block_k=16, block_n=16, block_d=16, block_do=16, block_t=2, bwd_block_n=16,
                                  num_warps=4, num_stages=1),
    )


def make_inputs(b, k, n, d, dtype=torch.float32, p_dtype=None, p_scale=1.0, present=0.7):
    q = torch.randn(b, k, d).to(dtype)
    p = (torch.randn(b, n, d) * p_scale).to(p_dtype or dtype)
    lab = torch.randint(0, k + 2, (b, n))
    lab[lab == k + 1] = 255  # ignored patches; 0 = background
    cls = (torch.rand(b, k) < present).long()
    if k:
        cls[:, 0] = 1
    return q, p, lab, cls


def run_both(q, p, lab, cls, t):
    """(fused loss, fused grad of q, reference loss, reference grad of q) on DEVICE; reference in float64."""
    q, p, lab, cls = on_device(q, p, lab, cls)
    qf = q.detach().clone().requires_grad_(True)
    pf = p.detach().clone().requires_grad_(True)
    loss = kernels.lir_loss(qf, pf, lab, cls, t)
    loss.backward()
    assert pf.grad is None  # the patch tokens are detached (docs/METHOD.md, L_cre)
    qr = q.detach().double().requires_grad_(True)
    loss_ref = reference.lir_loss(qr, p.detach().double(), lab, cls, t)
    loss_ref.backward()
    return loss, qf.grad, loss_ref, qr.grad


def check(q, p, lab, cls, t=0.5, tol=None):
    tol = tolerance("lir", q.dtype) if tol is None else tol
    loss, grad, loss_ref, grad_ref = run_both(q, p, lab, cls, t)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == q.dtype and grad.shape == q.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.isfinite(loss_ref)
    assert rel(loss, loss_ref) <= tol, (loss.item(), loss_ref.item())
    assert rel(grad, grad_ref) <= tol, rel(grad, grad_ref)
    return loss, grad, loss_ref, grad_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 37, 48), (3, 1, 29, 20), (1, 20, 300, 100)])
def test_matches_reference(triton_backend, dtype, shape):
    check(*make_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 37, 48), (2, 1, 29, 20), (2, 37, 53, 40)])
def test_matches_reference_multi_block(triton_backend, small_blocks, dtype, shape):
    check(*make_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_temperatures(triton_backend, small_blocks, temperature):
    check(*make_inputs(2, 5, 37, 48), t=temperature)


def test_large_logits(triton_backend, small_blocks):
    """Logits of order 1e3 (t = 0.01, |p| ~ 100): finite, as the float64 reference."""
    q, p, lab, cls = make_inputs(2, 5, 37, 48, p_scale=15.0)
    loss, _, loss_ref, _ = check(q, p, lab, cls, t=0.01)
    z = torch.nn.functional.normalize(q.double(), dim=-1) @ p.double().transpose(1, 2) / 0.01
    assert z.abs().max() > 1e3
    assert loss_ref.item() > 100.0
    # the published form exp(z) overflows here; the log-softmax form does not
    assert not torch.isfinite(z.float().exp()).all()


def test_class_without_patch(triton_backend, small_blocks):
    """Present classes whose label has no patch contribute 0 (and no gradient)."""
    b, k, n, d = 2, 6, 37, 24
    q, p, _, cls = make_inputs(b, k, n, d)
    lab = torch.randint(0, 3, (b, n))  # only classes 0 and 1 have patches
    cls[:] = 1
    _, grad, _, _ = check(q, p, lab, cls)
    assert torch.count_nonzero(grad[:, 2:]) == 0


def test_no_present_class(triton_backend, small_blocks):
    q, p, lab, cls = make_inputs(2, 5, 37, 24)
    cls.zero_()
    loss, grad, loss_ref, _ = run_both(q, p, lab, cls, 0.5)
    assert loss.item() == loss_ref.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("cls_dtype", [torch.bool, torch.float32, torch.uint8])
def test_cls_label_dtypes(triton_backend, small_blocks, cls_dtype):
    q, p, lab, cls = make_inputs(2, 5, 37, 24)
    check(q, p, lab, cls.to(cls_dtype))


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32])
def test_label_dtypes(triton_backend, small_blocks, label_dtype):
    q, p, lab, cls = make_inputs(2, 5, 37, 24)
    check(q, p, lab.to(label_dtype), cls)


def test_mixed_dtypes(triton_backend, small_blocks):
    q, p, lab, cls = make_inputs(2, 5, 37, 24, dtype=torch.float32, p_dtype=torch.float16)
    check(q, p, lab, cls, tol=tolerance("lir", torch.float32))  # p's fp16 values are the inputs of both sides


def test_float64_inputs(triton_backend, small_blocks):
    """fp64 tokens are accepted (computed in fp32); the gradient comes back in fp64."""
    check(*make_inputs(2, 5, 37, 24, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(2, 3, 0, 8), (2, 0, 5, 8)])
def test_empty_inputs(triton_backend, shape):
    q, p, lab, cls = make_inputs(*shape)
    loss, grad, loss_ref, _ = run_both(q, p, lab, cls, 0.5)
    assert loss.item() == loss_ref.item() == 0.0
    assert grad.shape == q.shape and torch.count_nonzero(grad) == 0


def test_tiny_class_token(triton_backend, small_blocks):
    """A class token with ||q|| < 1e-12 takes F.normalize's clamp branch."""
    q, p, lab, cls = make_inputs(2, 5, 37, 24)
    cls[:] = 1
    q[0, 1] *= 1e-14
    check(q, p, lab, cls)


def test_non_contiguous_inputs(triton_backend, small_blocks):
    b, k, n, d = 2, 5, 37, 24
    q = torch.randn(b, d, k).transpose(1, 2)
    p = torch.randn(n, b, d).transpose(0, 1)
    lab = torch.randint(0, k + 1, (n, b)).t()
    cls = torch.ones(k, b, dtype=torch.int64).t()
    assert not (q.is_contiguous() or p.is_contiguous() or lab.is_contiguous() or cls.is_contiguous())
    check(q, p, lab, cls)


def test_grad_scales_with_upstream(triton_backend, small_blocks):
    q, p, lab, cls = on_device(*make_inputs(2, 5, 37, 24))
    qf = q.clone().requires_grad_(True)
    (kernels.lir_loss(qf, p, lab, cls, 0.5) * -2.5).backward()
    qr = q.double().requires_grad_(True)
    (reference.lir_loss(qr, p.double(), lab, cls, 0.5) * -2.5).backward()
    assert rel(qf.grad, qr.grad) <= tolerance("lir", torch.float32)


def test_torch_compile_fullgraph(triton_backend):
    """Inductor, the op inside a larger graph, the patch tokens carrying a graph of their own."""
    b, k, n, d = 2, 5, 37, 24
    q, p, lab, cls = on_device(*make_inputs(b, k, n, d))
    w = on_device(torch.randn(d, d) / d**0.5)

    def f(q, p, lab, cls):
        return 0.2 * kernels.lir_loss(q @ w, torch.tanh(p), lab, cls, 0.5) + q.square().mean()

    qf = q.clone().requires_grad_(True)
    pf = p.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True)(qf, pf, lab, cls)
    out.backward()
    qr = q.double().requires_grad_(True)
    ref = 0.2 * reference.lir_loss(qr @ w.double(), torch.tanh(p.double()), lab, cls, 0.5) + qr.square().mean()
    ref.backward()
    assert rel(out, ref) <= tolerance("lir", torch.float32)
    assert rel(qf.grad, qr.grad) <= tolerance("lir", torch.float32)
    assert pf.grad is None


def test_production_shape(triton_backend):
    """B = 4, K = 20, N = 784 (448 crop), D = 768, fp32, default blocks."""
    check(*make_inputs(4, 20, 784, 768), t=0.5)


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [784, 3136])
def test_gpu_matches_reference(triton_backend, dtype, n):
    q, p, lab, cls = make_inputs(4, 20, n, 768, dtype=dtype)
    check(q.cuda(), p.cuda(), lab.cuda(), cls.cuda())


@pytest.mark.gpu
def test_gpu_large_logits_and_deterministic(triton_backend):
    q, p, lab, cls = (t.cuda() for t in make_inputs(4, 20, 3136, 768, p_scale=15.0))
    check(q, p, lab, cls, t=0.01)
    grads = []
    for _ in range(2):
        qf = q.clone().requires_grad_(True)
        loss = kernels.lir_loss(qf, p, lab, cls, 0.01)
        loss.backward()
        grads.append((loss.detach(), qf.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
