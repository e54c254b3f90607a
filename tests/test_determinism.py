"""Run-to-run reproducibility: with torch.use_deterministic_algorithms(True) every fused op gives the
same bits twice, forward and every input gradient (the Triton kernels on tests/helpers.DEVICE).

Only the energy's default path (C <= 32) adds with atomics (docs/METHOD.md, L_reg); the mode
selects its two-sided path. The other ops have no atomics and reduce in a fixed order in either
mode. Under the interpreter programs run one after another, so this is a real check on a GPU only;
on the CPU it still checks that the deterministic mode runs every op.
"""
import pytest
import torch

import kernels
from helpers import DEVICE, force_backend

B, K, N, D = 2, 5, 37, 48


def _draw(seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    labels = torch.randint(0, 4, (B, N), generator=gen)
    labels[torch.rand(B, N, generator=gen) < 0.2] = 255
    cls_labels = (torch.rand(B, K, generator=gen) < 0.5).float()
    cls_labels[:, 0] = 1
    image = (torch.rand(B, 3, 11, 13, generator=gen) * 255).round()
    probs = torch.randn(B, 21, 11, 13, generator=gen).softmax(1)
    gate = torch.rand(B, 11, 13, generator=gen)
    return dict(
        affinity=((randn(B, N, D),), lambda t: kernels.affinity_loss(t, labels.to(DEVICE))),
        lir=((randn(B, K, D), randn(B, N, D)),
             lambda c, p: kernels.lir_loss(c, p, torch.randint(0, K + 1, (B, N), generator=gen).to(DEVICE),
                                           cls_labels.to(DEVICE), 0.5)),
        gcr=((randn(B, K, D), randn(B, K + N, D)), lambda h, e: kernels.gcr_aggregate(h, e, 3).square().sum()),
        attention=((randn(B, 3, 4 + K + N, 16), randn(B, 3, 4 + K + N, 16)),
                   lambda q, k: kernels.class_patch_attention(q, k, 4, K).sum()),
        par=((image.to(DEVICE), probs.to(DEVICE)), lambda i, m: kernels.par_refine(i, m, (1, 2, 4), 3).sum()),
        energy=((image.to(DEVICE), probs.to(DEVICE)),
                lambda i, p: kernels.dense_energy_loss(i, p, gate.to(DEVICE), 15.0, 50.0)),
    )


# which inputs carry a gradient: L_cre detaches the patch tokens, L_reg the image; attention and PAR
# have none
GRAD = {"affinity": (True,), "lir": (True, False), "gcr": (True, True), "attention": (False, False),
        "par": (False, False), "energy": (False, True)}


def _run(op, seed):
    inputs, fn = _draw(seed)[op]
    leaves = [x.clone().requires_grad_(g) for x, g in zip(inputs, GRAD[op])]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad]) if out.requires_grad else ()
    return out.detach(), grads


@pytest.fixture
def deterministic(monkeypatch):
    force_backend(monkeypatch, "triton")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("op", ["affinity", "lir", "gcr", "attention", "par", "energy"])
def test_same_bits_twice_in_deterministic_mode(op, deterministic):
    (out1, grads1), (out2, grads2) = _run(op, 7), _run(op, 7)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2), op
    assert len(grads1) == len(grads2) == sum(GRAD[op])
    for g1, g2 in zip(grads1, grads2):
        assert torch.isfinite(g1).all() and torch.equal(g1, g2), op
