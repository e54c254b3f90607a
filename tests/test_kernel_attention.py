"""class_patch_attention: the Triton kernels (compiled on CUDA, the interpreter on the CPU;
tests/helpers.DEVICE) against the reference computed in float64 on the same inputs."""
import pytest
import torch

import kernels
from helpers import DEVICE, rel as rel_err, tol, force_backend
from kernels import attention, reference

REDUCES = ("mean_softmax", "sum_logits")
# fp16 / bf16: the oracle runs on the same (upcast) half values and the kernels' products are
# exact in fp32 (half dot with fp32 accumulation), so the fp32 bar holds for them too (measured
# ~2e-7 on the interpreter); it is stricter than the project's 1e-2 for half inputs.
TOL = {dt: tol("attention", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}


def oracle(q, k, num_prefix, num_cls, reduce):
    return reference.class_patch_attention(q.double(), k.double(), num_prefix, num_cls, reduce)


def timm_qk(b, heads, t, d, dtype, device=DEVICE):
    """q, k as timm's Attention makes them: slices of qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)."""
    qkv = torch.randn(b, t, 3, heads, d).to(dtype).to(device).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k


def plain_qk(b, heads, t, d, dtype, device=DEVICE):
    q = torch.randn(b, heads, t, d).to(dtype).to(device)
    k = torch.randn(b, heads, t, d).to(dtype).to(device)
    return q, k


# (B, heads, num_prefix, num_cls, N, d, layout, block_m): odd T everywhere
CASES = {
    "basic": (2, 3, 2, 5, 37, 64, "plain", None),
    "no_prefix_one_class_d48": (2, 2, 0, 1, 29, 48, "plain", None),
    "k_gt_default_block_d40": (1, 2, 3, 70, 19, 40, "plain", None),  # K = 70 > BLOCK_M = 64
    "k_gt_forced_block": (2, 3, 1, 37, 21, 64, "timm", 16),  # 3 query blocks of 16
    "timm_layout": (2, 3, 4, 6, 45, 64, "timm", None),
    "n_gt_two_key_blocks": (1, 2, 4, 3, 150, 32, "timm", None),
}


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_float64_reference(case, reduce):
    b, heads, p, kc, n, d, layout, block_m = CASES[case]
    make = timm_qk if layout == "timm" else plain_qk
    q, k = make(b, heads, p + kc + n, d, torch.float32)
    out = attention._launch(q, k, p, kc, reduce, block_m=block_m)
    ref = oracle(q, k, p, kc, reduce)
    assert out.shape == (b, kc, n) and out.dtype == torch.float32
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["plain", "timm"])
def test_half_inputs_match_float64_reference(layout, dtype, reduce):
    q, k = (timm_qk if layout == "timm" else plain_qk)(2, 3, 2 + 5 + 37, 48, dtype)
    out = attention._launch(q, k, 2, 5, reduce)
    assert out.dtype == torch.float32
    assert rel_err(out, oracle(q, k, 2, 5, reduce)) <= TOL[dtype]


@pytest.mark.parametrize("reduce", REDUCES)
def test_public_op_dispatches_to_triton(monkeypatch, reduce):
    force_backend(monkeypatch, "triton")
    assert kernels.resolve_backend("class_patch_attention", DEVICE) == "triton"
    q, k = timm_qk(2, 3, 1 + 4 + 27, 64, torch.float32)
    out = kernels.class_patch_attention(q, k, 1, 4, reduce)
    assert torch.equal(out, attention._launch(q, k, 1, 4, reduce))
    assert rel_err(out, oracle(q, k, 1, 4, reduce)) <= TOL[torch.float32]


def test_mean_softmax_is_a_mean_of_probabilities():
    """Rows of the full softmax sum to 1, so the patch part of each head-mean is in (0, 1) and
    the prefix + class keys take the rest (the normalization really runs over all T keys)."""
    q, k = plain_qk(2, 4, 3 + 5 + 40, 64, torch.float32)
    out = attention._launch(q, k, 3, 5, "mean_softmax")
    probs = (q.double()[:, :, 3:8] @ k.double().transpose(-1, -2) / 8).softmax(-1).mean(1)
    assert (out > 0).all() and (out.sum(-1) < 1).all()
    torch.testing.assert_close(out.double().sum(-1), probs[..., 8:].sum(-1), rtol=TOL[torch.float32], atol=1e-6)


def test_large_logits_do_not_overflow():
    """Scaled logits of a few hundred: the online max keeps every exp2 argument <= 0."""
    q, k = plain_qk(1, 2, 2 + 3 + 70, 64, torch.float32)
    q = q * 12.0
    out = attention._launch(q, k, 2, 3, "mean_softmax")
    ref = oracle(q, k, 2, 3, "mean_softmax")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_requires_grad_inputs_give_a_detached_map(monkeypatch):
    force_backend(monkeypatch, "triton")
    q, k = plain_qk(1, 2, 1 + 2 + 21, 64, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    for reduce in REDUCES:
        out = kernels.class_patch_attention(q, k, 1, 2, reduce)
        assert not out.requires_grad and out.grad_fn is None
        assert rel_err(out, oracle(q.detach(), k.detach(), 1, 2, reduce)) <= TOL[torch.float32]
    # a graph that also uses q elsewhere still backpropagates through that other use
    (q.sum() + kernels.class_patch_attention(q, k, 1, 2, "mean_softmax").sum()).backward()
    assert torch.equal(q.grad, torch.ones_like(q)) and k.grad is None


def test_deterministic_run_to_run():
    q, k = timm_qk(2, 5, 2 + 6 + 53, 64, torch.float32)
    for reduce in REDUCES:
        assert torch.equal(attention._launch(q, k, 2, 6, reduce), attention._launch(q, k, 2, 6, reduce))


def test_float64_and_empty_batch_take_the_reference(monkeypatch):
    force_backend(monkeypatch, "triton")
    q, k = plain_qk(1, 2, 1 + 2 + 13, 16, torch.float64)
    out = kernels.class_patch_attention(q, k, 1, 2, "mean_softmax")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, oracle(q, k, 1, 2, "mean_softmax"), rtol=0, atol=0)
    q0, k0 = plain_qk(0, 2, 1 + 2 + 13, 16, torch.float32)
    assert kernels.class_patch_attention(q0, k0, 1, 2, "sum_logits").shape == (0, 2, 13)


def test_torch_compile_fullgraph(monkeypatch):
    force_backend(monkeypatch, "triton")
    q, k = timm_qk(2, 3, 4 + 5 + 31, 48, torch.float32)

    @torch.compile(fullgraph=True)
    def maps(q, k):
        return (
            kernels.class_patch_attention(q, k, 4, 5, "mean_softmax"),
            kernels.class_patch_attention(q, k, 4, 5, "sum_logits"),
        )

    mean, logits = maps(q, k)
    assert rel_err(mean, oracle(q, k, 4, 5, "mean_softmax")) <= TOL[torch.float32]
    assert rel_err(logits, oracle(q, k, 4, 5, "sum_logits")) <= TOL[torch.float32]


@pytest.mark.parametrize("reduce", REDUCES)
def test_vit_b_shape(reduce):
    """ViT-B/16 at the 448 crop: B = 2, 12 heads, T = 4 registers + 20 classes + 784 patches."""
    q, k = timm_qk(2, 12, 4 + 20 + 784, 64, torch.float32)
    out = attention._launch(q, k, 4, 20, reduce)
    assert rel_err(out, oracle(q, k, 4, 20, reduce)) <= TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [784, 3136])
def test_gpu_production_shapes(n, dtype, reduce):
    q, k = timm_qk(4, 12, 4 + 20 + n, 64, dtype)
    out = attention.class_patch_attention(q, k, 4, 20, reduce)
    # bf16 / fp16 operands are exact in the fp32 products, so every dtype meets the fp32 bar
    assert rel_err(out, oracle(q, k, 4, 20, reduce)) <= TOL[torch.float32]
    again = attention.class_patch_attention(q, k, 4, 20, reduce)
    assert torch.equal(out, again)
