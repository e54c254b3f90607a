"""lir_loss (docs/METHOD.md, L_cre) alone: reference eager, reference compiled, fused;
forward and forward+backward (the gradient goes to the class tokens only).

Production shapes: B = 4 images, K = 20 classes (VOC), D = 768, N = 784 (448 crop) and
N = 3136 (896 crop), t = 0.5, labels in 0..K with 20% ignored (255), about half of the classes
present. The op is memory-bound: it reads the patch tokens once per pass.

FLOPs: 2 B K N D for the logits, and as much again for the gradient sum_n e_cn p_n.
Bytes: patch and class tokens read once per pass, the class-token gradient written once.
"""
import pytest
import torch

from common import DEVICE, VARIANTS, fwd_bwd, measure, op_variant

B, K, D, TEMPERATURE = 4, 20, 768, 0.5
DTYPES = ("float32", "bfloat16") if DEVICE.type == "cuda" else ("float32",)


def _ideal_bytes(n: int, elt: int, backward: bool) -> float:
    patches, classes, labels = B * n * D * elt, B * K * D * elt, B * n * 8 + B * K * 8
    fwd = patches + classes + labels
    return fwd + (patches + 2 * classes + labels if backward else 0)


def _flops(n: int, backward: bool) -> float:
    return 2.0 * B * K * n * D * (2 if backward else 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("n", (784, 3136))
@pytest.mark.parametrize("variant", VARIANTS)
def test_lir_loss(benchmark, variant, n, pass_, dtype):
    fn = op_variant("lir_loss", variant)
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cls_tokens = torch.randn(B, K, D, generator=gen).to(device=DEVICE, dtype=dt)
    patch_tokens = torch.randn(B, n, D, generator=gen).to(device=DEVICE, dtype=dt)
    labels = torch.randint(0, K + 1, (B, n), generator=gen)
    labels[torch.rand(B, n, generator=gen) < 0.2] = 255
    labels = labels.to(DEVICE)
    cls_labels = (torch.rand(B, K, generator=gen) < 0.5).long().to(DEVICE)
    shape = dict(B=B, K=K, N=n, D=D, dtype=dtype)

    def call():
        return fn(cls_tokens, patch_tokens, labels, cls_labels, TEMPERATURE)

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return call()
    else:
        cls_tokens.requires_grad_()
        run = fwd_bwd(call, cls_tokens)
    measure(
        benchmark, run, variant=variant, pass_=pass_, shape=shape,
        nbytes=_ideal_bytes(n, cls_tokens.element_size(), pass_ != "fwd"), flops=_flops(n, pass_ != "fwd"),
    )
