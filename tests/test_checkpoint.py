"""Checkpoints: timm --pretrained initialization, published MoRe conversion, load_model."""
import importlib.util
import pathlib

import pytest
import timm
import torch

import more_fast
from more_fast.io import read_state_dict
from more_fast.model.pretrained import init_from_timm_state
from more_fast.convert import convert_state_dict
from more_fast.model import MoReNet

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")  # the same math, without the interpreter's cost


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- --pretrained
@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    torch.manual_seed(1)
    state = timm.create_model(TINY, pretrained=False).state_dict()
    folder = tmp_path_factory.mktemp("timm")
    torch.save(state, folder / "vit_tiny.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "vit_tiny.safetensors"))
    return state, folder / "vit_tiny.pth", folder / "vit_tiny.safetensors"


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_pretrained_init_from_timm_file(timm_files, kind):
    state, pth, safe = timm_files
    net = MoReNet(TINY, num_classes=3, num_registers=2)
    enc = net.encoder
    unused = enc.load_pretrained_vit(read_state_dict(pth if kind == "pth" else safe))
    assert set(unused) == {"head.weight", "head.bias"}
    r, k = 2, 3
    cls, pos = state["cls_token"], state["pos_embed"]  # 1 x 1 x D, 1 x (1 + 196) x D
    # every register and class token starts as the single class token
    assert torch.equal(enc.cls_token, cls.expand(1, r + k, -1))
    # class tokens' position embeddings copy the class token's; registers' are re-drawn
    assert torch.equal(enc.pos_embed[:, r:r + k], pos[:, :1].expand(1, k, -1))
    regs = enc.pos_embed[:, :r]
    assert not torch.equal(regs, pos[:, :1].expand(1, r, -1))
    # a fresh truncated normal draw at timm's defaults: std 1 cut at +-2 (0.88 after the cut)
    assert 0.75 < float(regs.detach().std()) < 1.0 and float(regs.detach().abs().max()) <= 2.0
    # patch position embeddings are kept, at the pretrained 14 x 14 grid
    assert torch.equal(enc.pos_embed[:, r + k:], pos[:, 1:])
    own = enc.state_dict()
    for key in [k for k in state if k.startswith(("blocks.", "patch_embed.", "norm."))]:
        assert torch.equal(own[key], state[key]), key


def test_pretrained_wrapped_and_prefixed(tmp_path, timm_files):
    state = timm_files[0]
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    net = MoReNet(TINY, num_classes=2)
    net.encoder.load_pretrained_vit(read_state_dict(path))
    assert torch.equal(net.encoder.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])


def test_pretrained_missing_keys_is_a_clear_error(timm_files):
    state = dict(timm_files[0])
    del state["blocks.5.mlp.fc1.weight"]
    net = MoReNet(TINY, num_classes=2)
    with pytest.raises(ValueError, match=r"lacks 1 .*blocks\.5\.mlp\.fc1\.weight"):
        init_from_timm_state(net.encoder, state)
    with pytest.raises(ValueError, match="cls_token"):
        init_from_timm_state(net.encoder, {k: v for k, v in state.items() if k != "cls_token"})


def test_pretrained_wrong_width_is_a_clear_error():
    small = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1).state_dict()
    net = MoReNet(TINY, num_classes=2)
    with pytest.raises(ValueError, match=r"width 192"):
        init_from_timm_state(net.encoder, small)


def test_pretrained_rejects_a_more_checkpoint_with_a_hint():
    net = MoReNet(TINY, num_classes=2)
    with pytest.raises(ValueError, match="load_model"):
        init_from_timm_state(net.encoder, net.state_dict())


# ----------------------------------------------------------------------------- published checkpoints
def published_layout(net: MoReNet) -> dict:
    """The state dict as the published code saves it: DDP's 'module.' prefix, the GCR's unused
    _fc1 and the ViT's unused head (our names are the published ones otherwise)."""
    state = {f"module.{k}": v.clone() for k, v in net.state_dict().items()}
    d = net.encoder.embed_dim
    r_k = net.encoder.num_prefix
    state["module.graph_layer._fc1.weight"] = torch.randn(d, d)
    state["module.graph_layer._fc1.0.bias"] = torch.randn(d)
    state["module.encoder.head.weight"] = torch.randn(r_k, d)
    state["module.encoder.head.bias"] = torch.randn(r_k)
    return state


def outputs(net: MoReNet, x: torch.Tensor) -> dict:
    with torch.no_grad():
        out = net.eval()(x)
    return {"logits": out.logits, "aux_logits": out.aux_logits, "seg": out.seg,
            "class_tokens": out.class_tokens, "patch_tokens": out.patch_tokens, "aux_patch": out.aux_patch_tokens}


def test_convert_published_checkpoint_matches_the_network(tmp_path):
    torch.manual_seed(2)
    decoder_bias = True  # as the published LargeFOV may have; test_convert_reports covers bias-free
    net = MoReNet(TINY, num_classes=4, num_registers=4, decoder_bias=decoder_bias).eval()
    with torch.no_grad():  # a trained network's tokens differ from one another
        net.encoder.cls_token.add_(torch.randn_like(net.encoder.cls_token))
        net.encoder.pos_embed.add_(0.1 * torch.randn_like(net.encoder.pos_embed))
    src, dst = tmp_path / "model_iter_sota.pth", tmp_path / "converted.pt"
    torch.save(published_layout(net), src)
    script = load_script("convert_checkpoint")
    assert script.main(["--from-more", str(src), "--out", str(dst)]) == 0
    loaded = more_fast.load_model(dst)
    assert not loaded.training
    assert loaded.config["backbone"] == TINY and loaded.config["num_classes"] == 4
    assert loaded.config["num_registers"] == 4 and loaded.config["decoder_bias"] == decoder_bias
    x = torch.randn(2, 3, 48, 64)
    want, got = outputs(net, x), outputs(loaded, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    # the published file also loads directly (converted in memory)
    direct = more_fast.load_model(src)
    torch.testing.assert_close(outputs(direct, x)["class_tokens"], want["class_tokens"], rtol=1e-5, atol=1e-5)
    # no stray temporary files next to the output (atomic write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.pt", "model_iter_sota.pth"]


def test_convert_reports_shapes_and_dropped_keys():
    net = MoReNet(TINY, num_classes=3, num_registers=1)
    state, config, report = convert_state_dict({"state_dict": published_layout(net)})
    assert (report.num_classes, report.num_registers, report.embed_dim, report.depth) == (3, 1, 192, 12)
    assert report.grid == 14 and report.patch_size == 16 and config["img_size"] is None
    assert config["decoder_bias"] is False and report.decoder_bias is False
    assert sorted(report.dropped) == ["encoder.head.bias", "encoder.head.weight", "graph_layer._fc1.0.bias",
                                      "graph_layer._fc1.weight"]
    assert set(state) == set(net.state_dict())


def test_convert_unknown_keys_and_unknown_backbones(tmp_path):
    net = MoReNet(TINY, num_classes=2)
    state = published_layout(net)
    state["module.encoder.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"no place in MoReNet: \['encoder\.mystery\.weight'\]"):
        convert_state_dict(state)
    _, _, report = convert_state_dict(state, ignore_unknown=True)
    assert report.unknown == ["encoder.mystery.weight"]
    shallow = MoReNet(TINY, num_classes=2, depth=2)
    with pytest.raises(ValueError, match="embed dim 192 and depth 2"):
        convert_state_dict(shallow.state_dict())
    with pytest.raises(ValueError, match="missing tensor 'classifier.weight'"):
        convert_state_dict({"foo": torch.zeros(1)})
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    assert load_script("convert_checkpoint").main(["--from-more", str(bad), "--out", str(tmp_path / "o.pt")]) == 2
    assert not (tmp_path / "o.pt").exists()
    with pytest.raises(ValueError, match="neither a more_fast checkpoint"):
        more_fast.load_model(bad)


def test_convert_script_names_the_backbone(tmp_path):
    """--backbone: a family whose heads no tensor stores (DeiT-III here) converts when named;
    inferred from the width and depth it would be taken for a plain ViT."""
    torch.manual_seed(4)
    name = "deit3_small_patch16_224"
    net = MoReNet(name, num_classes=3, num_registers=2, depth=2, decoder_dim=16, img_size=64).eval()
    src = tmp_path / "published.pth"
    torch.save(published_layout(net), src)
    script = load_script("convert_checkpoint")
    dst = tmp_path / "named.pt"
    assert script.main(["--from-more", str(src), "--out", str(dst), "--backbone", name]) == 0
    loaded = more_fast.load_model(dst)
    assert loaded.config["backbone"] == name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, net(x).logits, rtol=0, atol=0)
    assert script.main(["--from-more", str(src), "--out", str(tmp_path / "bad.pt"), "--backbone", "resnet18"]) == 2
    assert not (tmp_path / "bad.pt").exists()
