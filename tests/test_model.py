"""The MoRe network: shapes, token initialization, attention switch, published GCR layout."""
import pytest
import torch

from more_fast.model import GCR, MoReNet

TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MoReNet(TINY, num_classes=5).eval()


@pytest.mark.parametrize("crop", [224, 448])
def test_output_shapes(net, crop):
    out = net(torch.randn(2, 3, crop, crop))
    g = crop // 16
    d = net.encoder.embed_dim
    assert out.logits.shape == (2, 5) and out.aux_logits.shape == (2, 5)
    assert out.seg.shape == (2, 6, g, g)
    assert out.class_tokens.shape == (2, 5, d)
    assert out.patch_tokens.shape == (2, g * g, d) and out.aux_patch_tokens.shape == (2, g * g, d)
    assert out.grid == (g, g)


def test_non_square_input_and_pos_embed_at_pretrained_grid(net):
    out = net(torch.randn(1, 3, 64, 96))
    assert out.grid == (4, 6) and out.patch_tokens.shape[1] == 24
    pos = net.encoder._pos_embed(14, 14)
    torch.testing.assert_close(pos, net.encoder.pos_embed)  # no resize at the pretrained grid


def test_tokens_start_as_copies_of_the_class_token():
    m = MoReNet(TINY, num_classes=3, num_registers=4)
    cls = m.encoder.cls_token[0]
    assert cls.shape[0] == 7 and torch.equal(cls, cls[:1].expand_as(cls))
    pos = m.encoder.pos_embed[0, :7]
    assert torch.equal(pos[4:], pos[4:5].expand(3, -1))  # class tokens share the class-token position
    assert not torch.equal(pos[0], pos[4])  # registers re-drawn


def test_explicit_attention_matches_sdpa():
    torch.manual_seed(1)
    a = MoReNet(TINY, num_classes=4, attn_impl="sdpa").eval()
    b = MoReNet(TINY, num_classes=4, attn_impl="explicit").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    oa, ob = a(x), b(x)
    torch.testing.assert_close(oa.patch_tokens, ob.patch_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(oa.class_tokens, ob.class_tokens, rtol=1e-4, atol=1e-4)


def test_class_patch_attention_does_not_change_outputs(net):
    x = torch.randn(1, 3, 64, 64)
    plain, with_attn = net(x), net(x, attn_reduce="mean_softmax")
    assert torch.equal(plain.patch_tokens, with_attn.patch_tokens)
    attn = with_attn.class_patch_attn
    assert attn.shape == (1, 5, 16) and not attn.requires_grad
    assert bool((attn.sum(-1) < 1).all())  # softmax over all T keys, patches are part of them


def test_aux_tokens_come_from_block_minus_3(net):
    captured = {}
    handle = net.encoder.blocks[-3].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    out = net(torch.randn(1, 3, 32, 32))
    handle.remove()
    torch.testing.assert_close(out.aux_patch_tokens, captured["x"][:, net.encoder.num_prefix:])


def test_gcr_published_state_dict_loads_strict():
    d = 32
    published = {f"{name}.{p}": torch.randn(d, d) if p == "weight" and name != "norm" else torch.randn(d)
                 for name in ("head_proj", "tail_proj", "linear1", "linear2", "norm") for p in ("weight", "bias")}
    gcr = GCR(d)
    gcr.load_state_dict(published, strict=True)
    assert torch.equal(gcr.head_proj.weight, published["head_proj.weight"])


def test_gcr_module_gradients_flow_to_tokens_not_patches():
    gcr = GCR(16)
    t = torch.randn(2, 4, 16, requires_grad=True)
    p = torch.randn(2, 9, 16, requires_grad=True)
    q = gcr(t, p)
    assert q.shape == (2, 4, 16)
    q.sum().backward()
    assert t.grad is not None and p.grad is None  # P enters the graph detached (stopgrad)
    assert gcr.topk(20) == 10 and gcr.topk(80) == 40 and gcr.topk(1) == 1


def test_param_groups_cover_every_parameter_once(net):
    groups = net.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert all("norm" in n for n, p in net.encoder.named_parameters() if id(p) in {id(q) for q in groups["backbone_norm"]})


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_impl"):
        MoReNet(TINY, num_classes=2, attn_impl="flash")
    with pytest.raises(ValueError, match="score"):
        GCR(8, score="sum")
    m = MoReNet(TINY, num_classes=2)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="attn_reduce"):
        m(torch.randn(1, 3, 32, 32), attn_reduce="max")


def test_architecture_defaults_come_from_one_place():
    """R, k/K, the GCR score, the attention path and the decoder width: more_fast/model/published.py,
    read by the model's parts, MoReNet, TrainConfig and the VOC/COCO recipes (the synthetic recipe's
    narrow decoder is its own)."""
    import inspect

    from more_fast.model import LargeFOV, MoReBackbone, published
    from more_fast.training import COCO_RECIPE, VOC_RECIPE, TrainConfig

    want = {"num_registers": published.NUM_REGISTERS, "topk_ratio": published.TOPK_RATIO,
            "gcr_score": published.GCR_SCORE, "attn_impl": published.ATTN_IMPL,
            "decoder_dim": published.DECODER_DIM}
    defaults = lambda f: {k: p.default for k, p in inspect.signature(f).parameters.items()}  # noqa: E731
    assert {k: defaults(MoReNet)[k] for k in want} == want
    assert defaults(MoReBackbone)["num_registers"] == want["num_registers"]
    assert defaults(MoReBackbone)["attn_impl"] == want["attn_impl"]
    assert (defaults(GCR)["topk_ratio"], defaults(GCR)["score"]) == (want["topk_ratio"], want["gcr_score"])
    assert defaults(LargeFOV)["hidden"] == want["decoder_dim"]
    fields = {f.name: f.default for f in __import__("dataclasses").fields(TrainConfig)}
    assert {k: fields[k] for k in want if k != "decoder_dim"} == {k: v for k, v in want.items() if k != "decoder_dim"}
    for recipe in (VOC_RECIPE, COCO_RECIPE):
        cfg = TrainConfig(**recipe)
        net = MoReNet(cfg.backbone, cfg.num_classes, depth=1, decoder_dim=cfg.decoder_dim)
        assert {k: net.config[k] for k in want} == want
