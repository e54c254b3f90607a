"""dense_energy_loss (SPEC 2, L_reg) alone: reference eager, reference compiled, fused;
forward and forward+backward.

Production shape: L_reg runs at half the 448 crop, so B = 4 images of 224 x 224, C = 21 (VOC
classes + background), fp32 probabilities, sigma_rgb = 15, sigma_xy = 50. The exact Gaussian
touches every pixel pair: B * (HW)^2 = 1.0e10 pairs, each an exponential plus a C-wide
multiply-add, which is an attention with head size 5 and value size C.

On the CPU the production shape (1e10 exponentials per call, minutes on 2 cores) skips with
that reason, and a CPU stand-in shape (B = 4, 32 x 32, C = 21) runs the reference variants
instead, marked `cpu_standin` in its shape.
"""
import pytest
import torch

from common import DEVICE, VARIANTS, fwd_bwd, measure, op_variant

B, C, SIZE = 4, 21, 224
SIGMA_RGB, SIGMA_XY = 15.0, 50.0
CPU_STANDIN_SIZE = 32
CASES = [("production", SIZE)]
if DEVICE.type != "cuda":
    CASES.append(("cpu_standin", CPU_STANDIN_SIZE))


def _ideal_bytes(hw: int, backward: bool) -> float:
    """fp32 image, probs and gate read once and AS (fp32) written once; the backward reads AS
    and writes grad_probs."""
    fwd = B * (3 + C + 1) * hw * 4 + B * C * hw * 4
    return fwd + (2 * B * C * hw * 4 if backward else 0)


def _flops(hw: int) -> float:
    """Per pixel pair: 5 differences, 5 multiply-adds and a scale for the distance (~16 with the
    exponential counted as one), and 2C for the weighted sum over the C channels."""
    return B * float(hw) * hw * (16 + 2 * C)


@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("case, size", CASES, ids=[f"{n}-{s}x{s}" for n, s in CASES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_energy_loss(benchmark, variant, case, size, pass_):
    if DEVICE.type != "cuda" and variant != "fused" and case == "production":
        pytest.skip("the reference at 4 x 224 x 224 evaluates 1e10 exponentials per call: minutes "
                    "on the CPU (the cpu_standin case runs instead)")
    fn = op_variant("dense_energy_loss", variant)
    gen = torch.Generator(device="cpu").manual_seed(0)
    image = (torch.rand(B, 3, size, size, generator=gen) * 255).to(DEVICE)
    probs = torch.randn(B, C, size, size, generator=gen).softmax(1).to(DEVICE)
    gate = torch.rand(B, size, size, generator=gen).to(DEVICE)
    hw = size * size
    shape = dict(case=case, B=B, C=C, H=size, W=size, dtype="float32")
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(image, probs, gate, SIGMA_RGB, SIGMA_XY)
    else:
        probs.requires_grad_()
        run = fwd_bwd(lambda: fn(image, probs, gate, SIGMA_RGB, SIGMA_XY), probs)
    measure(
        benchmark, run, variant=variant, pass_=pass_, shape=shape,
        nbytes=_ideal_bytes(hw, pass_ != "fwd"), flops=_flops(hw),
    )
