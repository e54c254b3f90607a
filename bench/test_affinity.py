"""affinity_loss (docs/METHOD.md, L_ptc) alone: reference eager, reference compiled, fused;
forward and forward+backward.

Production shapes: B = 4 images, D = 768, N = 784 (448 crop) and N = 3136 (896 crop), labels
from 21 classes with 20% ignored (255). The reference materializes several B x N x N tensors
(|cos|, the pair masks; 157 MB each in fp32 at N = 3136); the fused op keeps the |cos| tiles in
registers, so peak memory is the headline next to time.

FLOPs: the two Gram products of the math, 2 B N^2 D each (the forward's <x_i, x_j>, the
backward's sum_j M_ij x_j); the fused forward computes half of its Gram product (symmetry) and
its backward recomputes the tiles, neither counted. Bytes: the tokens read once per pass and
the gradient written once.

On the CPU (2 cores) the reference at N = 3136 costs about 4 s forward and 8 s forward+backward
per call: those cases run one warm-up and one round, and the compiled reference at N = 3136
skips (its compilation plus two calls exceed ~20 s).
"""
import pytest
import torch

from common import DEVICE, VARIANTS, fwd_bwd, measure, op_variant

B, D, NUM_CLASSES, IGNORE = 4, 768, 21, 255
DTYPES = ("float32", "bfloat16") if DEVICE.type == "cuda" else ("float32",)


def _ideal_bytes(n: int, elt: int, backward: bool) -> float:
    tokens, labels = B * n * D * elt, B * n * 8
    return tokens + labels + (2 * tokens + labels if backward else 0)


def _flops(n: int, backward: bool) -> float:
    return 2.0 * B * n * n * D * (2 if backward else 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("n", (784, 3136))
@pytest.mark.parametrize("variant", VARIANTS)
def test_affinity_loss(benchmark, variant, n, pass_, dtype):
    cpu_large = DEVICE.type != "cuda" and n > 1000
    if cpu_large and variant == "reference_compiled":
        pytest.skip("CPU: compiling the reference and two calls at N = 3136 take well over 20 s")
    fn = op_variant("affinity_loss", variant)
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randn(B, n, D, generator=gen).to(device=DEVICE, dtype=dt)
    labels = torch.randint(0, NUM_CLASSES, (B, n), generator=gen)
    labels[torch.rand(B, n, generator=gen) < 0.2] = IGNORE
    labels = labels.to(DEVICE)
    shape = dict(B=B, N=n, D=D, dtype=dtype)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(tokens, labels, IGNORE)
    else:
        tokens.requires_grad_()
        run = fwd_bwd(lambda: fn(tokens, labels, IGNORE), tokens)
    rounds = dict(rounds=1, warmup=1) if cpu_large else {}
    measure(
        benchmark, run, variant=variant, pass_=pass_, shape=shape,
        nbytes=_ideal_bytes(n, tokens.element_size(), pass_ != "fwd"), flops=_flops(n, pass_ != "fwd"),
        **rounds,
    )
