"""Dense CRF energy (SPEC 2): Triton kernels (under the interpreter here) vs the float64 reference."""
import pytest
import torch

import kernels
from kernels import reference

TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", "triton")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(b, c, h, w, dtype, ci=3):
    image = (torch.rand(b, ci, h, w, dtype=torch.float64) * 255).to(dtype)
    probs = torch.randn(b, c, h, w, dtype=torch.float64).mul(2).softmax(1).to(dtype)
    gate = torch.rand(b, h, w, dtype=torch.float64)
    gate[0, : h // 3] = 0  # a band outside the crop
    gate[-1, :, -2:] = 0
    gate[gate < 0.1] = 0
    return image, probs, gate.to(dtype)


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


def test_dispatch_is_triton():
    assert kernels.resolve_backend("dense_energy_loss", torch.device("cpu")) == "triton"


@pytest.mark.parametrize(
    "b, c, h, w, dtype, sigma_rgb, sigma_xy",
    [
        (2, 5, 13, 17, torch.float32, 15.0, 50.0),  # the published sigmas
        (1, 1, 24, 20, torch.float32, 15.0, 10.0),  # C = 1, HW = 480 (not a tile multiple)
        (2, 21, 13, 17, torch.float32, 4.0, 1.5),  # narrow kernel: W nearly diagonal
        (1, 130, 7, 9, torch.float32, 15.0, 5.0),  # C above one channel block (128)
        (2, 21, 13, 17, torch.float16, 15.0, 10.0),
        (1, 4, 11, 13, torch.bfloat16, 15.0, 10.0),
        (1, 3, 11, 13, torch.float64, 15.0, 10.0),
    ],
)
def test_energy_value_and_gradient(b, c, h, w, dtype, sigma_rgb, sigma_xy):
    image, probs, gate = _inputs(b, c, h, w, dtype)
    loss, grad = _fused(image, probs, gate, sigma_rgb, sigma_xy)
    ref_loss, ref_grad = _reference(image, probs, gate, sigma_rgb, sigma_xy)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == probs.dtype and grad.shape == probs.shape
    assert _rel(loss, ref_loss) <= TOL[dtype]
    assert _rel(grad, ref_grad) <= TOL[dtype]


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
    ref_loss, ref_grad = _reference(image.detach(), probs, gate.detach(), 15.0, 10.0)
    assert _rel(loss, ref_loss) <= 1e-5
    assert _rel(p.grad, ref_grad) <= 1e-5


def test_upstream_gradient_scales():
    image, probs, gate = _inputs(1, 3, 9, 11, torch.float32)
    p = probs.clone().requires_grad_()
    (3.5 * kernels.dense_energy_loss(image, p, gate, 15.0, 10.0)).backward()
    _, ref_grad = _reference(image, probs, gate, 15.0, 10.0)
    assert _rel(p.grad, 3.5 * ref_grad) <= 1e-5


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
    assert _rel(loss, ref) <= 1e-5
    assert _rel(logits.grad, ref_logits.grad) <= 1e-5
