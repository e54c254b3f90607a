"""Every tested timm ViT family as the MoRe backbone, on the CPU at 2 blocks and a 4 x 4 patch grid.

Per family: the backbone reproduces timm's own forward (R = 0 registers, K = 1 class token, at
the pretrained grid, weights loaded through `load_pretrained_vit`); SDPA and explicit attention
agree with R + K > 1 prefix tokens, with and without the class-patch attention; two training
steps give the same losses on the reference and the Triton (interpreter) kernels and move the
backbone's own parameters; a state dict survives the round trip through more_fast.convert.
"""
import copy

import pytest
import timm
import torch
from helpers import DEVICE
from timm.models.beit import gen_relative_position_index

from more_fast.model.network import model_from_config
from more_fast.convert import convert_state_dict
from more_fast.model import MoReNet
from more_fast.model.backbone import MoReBackbone, rel_pos_index
from more_fast.training import TrainConfig
from more_fast.training.loop import TrainStep

FAMILIES = {  # name -> patch size
    "vit_small_patch16_224": 16,
    "vit_small_patch14_dinov2": 14,
    "vit_small_patch14_reg4_dinov2": 14,  # 4 timm registers, no_embed_class
    "deit3_small_patch16_224": 16,  # no_embed_class
    "beit_base_patch16_224": 16,  # relative position bias, no absolute position embedding
    "vit_base_patch16_siglip_224": 16,  # no class token, attention-pool head
    "eva02_tiny_patch14_224": 14,  # rotary embeddings
    "vit_base_patch16_clip_224": 16,  # norm_pre
}
NAMES = list(FAMILIES)
K, R = 3, 2


def crop(name: str) -> int:
    return 4 * FAMILIES[name]


_NETS = {}


def tiny_net(name: str) -> MoReNet:
    """A fresh copy of one MoReNet per family (2 blocks, pretrained grid 4 x 4), built once."""
    if name not in _NETS:
        torch.manual_seed(0)
        net = MoReNet(name, num_classes=K, num_registers=R, depth=2, decoder_dim=16, img_size=crop(name))
        with torch.no_grad():  # tokens that differ from one another, as after training
            net.encoder.cls_token.add_(torch.randn_like(net.encoder.cls_token))
        _NETS[name] = net
    return copy.deepcopy(_NETS[name])


def randomized_timm(name: str, **kw) -> torch.nn.Module:
    """timm's model at 2 blocks with every parameter moved off its init (zero biases, zero
    relative-position tables and unit layer scales would hide mistakes)."""
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, num_classes=0, depth=2, img_size=crop(name), **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_timm(name):
    ref = randomized_timm(name)
    bb = MoReBackbone(name, num_classes=1, num_registers=0, depth=2, img_size=crop(name)).eval()
    unused = bb.load_pretrained_vit(ref.state_dict())
    assert all(key.startswith("attn_pool.") for key in unused), unused  # SigLIP's head, nothing else
    x = torch.randn(2, 3, crop(name), crop(name))
    if not bb.has_class_token:
        # SigLIP: timm's twin with a class token that has no position embedding of its own
        # (no_embed_class) is the same network once that token is ours (token + its position)
        twin = timm.create_model(name, pretrained=False, num_classes=0, depth=2, img_size=crop(name),
                                 class_token=True, no_embed_class=True, global_pool="token").eval()
        twin.load_state_dict({**ref.state_dict(), "cls_token": bb.cls_token + bb.pos_embed[:, :1]}, strict=False)
        ref = twin
        # the class token starts as the mean patch token at the mean patch position
        mean_token = bb.patch_embed(torch.zeros(1, 3, bb.patch_size, bb.patch_size))
        torch.testing.assert_close(bb.cls_token[0, 0], mean_token.reshape(-1), rtol=0, atol=0)
        torch.testing.assert_close(bb.pos_embed[0, 0], ref.pos_embed[0].mean(0), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want = ref.forward_features(x)
        if bb.uses_fc_norm:  # BEiT, EVA-02: fc_norm as the tokens' final norm
            want = ref.fc_norm(want)
        for attn_reduce in (None, "mean_softmax"):  # timm's blocks / this module's block forward
            out = bb(x, attn_reduce=attn_reduce)
            torch.testing.assert_close(out.patch_tokens, want[:, ref.num_prefix_tokens:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.class_tokens[:, 0], want[:, 0], rtol=1e-5, atol=1e-5)
    assert bb.num_timm_registers == (4 if "reg4" in name else 0)
    assert bb.num_prefix == bb.num_timm_registers + 1


@pytest.mark.parametrize("name", NAMES)
def test_prefix_tokens_explicit_matches_sdpa_and_class_patch_attention(name):
    net = tiny_net(name).eval()
    explicit = copy.deepcopy(net)
    explicit.encoder.attn_impl = "explicit"
    for block in explicit.encoder.blocks:
        block.attn.fused_attn = False
    x = torch.randn(2, 3, crop(name), crop(name) + FAMILIES[name])  # a 4 x 5 grid: resized positions
    with torch.no_grad():
        a = net.forward_features(x)
        b = net.forward_features(x, attn_reduce="mean_softmax")
        c = explicit.forward_features(x, attn_reduce="mean_softmax")
    for got in (b, c):
        torch.testing.assert_close(got.patch_tokens, a.patch_tokens, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.class_tokens, a.class_tokens, rtol=1e-4, atol=1e-4)
    assert a.grid == (4, 5) and a.patch_tokens.shape == (2, 20, net.encoder.embed_dim)
    assert a.class_tokens.shape == (2, K, net.encoder.embed_dim)
    cpa = b.class_patch_attn
    assert cpa.shape == (2, K, 20) and not cpa.requires_grad
    torch.testing.assert_close(c.class_patch_attn, cpa, rtol=1e-5, atol=1e-6)
    total = cpa.sum(-1)  # softmax over all T keys: the prefix keys take part
    assert bool((total > 0).all()) and bool((total < 1).all())
    if net.encoder.has_rel_pos:
        with pytest.raises(ValueError, match="sum_logits.*relative position bias"):
            net.forward_features(x, attn_reduce="sum_logits")
    else:
        assert net.forward_features(x, attn_reduce="sum_logits").class_patch_attn.shape == (2, K, 20)


def _steps(net: MoReNet, backend: str, monkeypatch, tmp_path) -> list[float]:
    # before the decoder joins (iteration 4 of this 40-iteration schedule): every loss term that the
    # backbone feeds; PAR and L_seg / L_reg see the decoder only, the same for every family
    cfg = TrainConfig(num_classes=K, crop_size=crop(net.config["backbone"]), cam_scales=(1.0,), kernels=backend,
                      warmup_iters=0, iters=2, schedule_iters=40, out=str(tmp_path))
    step = TrainStep(net.to(DEVICE), cfg, DEVICE)  # triton on a CPU tensor: only under the interpreter
    gen = torch.Generator().manual_seed(3)
    size = cfg.crop_size
    batch = {"image": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=gen),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    losses = []
    for it in (1, 2):
        total, terms = step.step(it, batch)
        assert set(terms) == {"cls", "aux", "mct", "ptc", "cre", "ure"}
        losses.append(float(total))
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_two_training_steps_on_both_kernel_backends(name, monkeypatch, tmp_path):
    before = dict(tiny_net(name).encoder.named_parameters())
    losses = {}
    for backend in ("reference", "triton"):
        net = tiny_net(name).train()
        losses[backend] = _steps(net, backend, monkeypatch, tmp_path / backend)
        assert all(torch.isfinite(torch.tensor(losses[backend])))
        moved = {key for key, p in net.encoder.named_parameters() if not torch.equal(p.cpu(), before[key])}
        want = {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"}
        want |= {key for key in before if key.endswith(("relative_position_bias_table", "reg_token", "q_bias"))}
        assert want <= moved, sorted(want - moved)
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_through_convert(name):
    net = tiny_net(name).eval()
    published = {f"module.{key}": value for key, value in net.state_dict().items()}  # as a DDP run saves it
    state, config, report = convert_state_dict({"state_dict": published}, backbone=name)
    assert {key: config[key] for key in net.config} == net.config
    assert (report.num_classes, report.num_registers, report.patch_size, report.grid) == (K, R, FAMILIES[name], 4)
    loaded = model_from_config(config).eval()
    loaded.load_state_dict(state, strict=True)
    # the same through a more_fast checkpoint object, whose model_config names the backbone
    again, _, _ = convert_state_dict({"model": net.state_dict(), "model_config": net.config})
    assert again.keys() == state.keys()
    x = torch.randn(1, 3, crop(name), crop(name))
    with torch.no_grad():
        want, got = net(x), loaded(x)
    for field in ("logits", "seg", "class_tokens", "patch_tokens"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0, msg=field)


def test_rel_pos_index_is_timms_at_one_prefix_token_and_clamps_beyond_the_window():
    torch.testing.assert_close(rel_pos_index((4, 5), (4, 5), 1), gen_relative_position_index((4, 5)))
    window, grid, p = (3, 3), (5, 4), 2
    index = rel_pos_index(window, grid, p)
    n = (2 * 3 - 1) * (2 * 3 - 1) + 3
    cells = [(y, x) for y in range(grid[0]) for x in range(grid[1])]
    for i, (qy, qx) in enumerate(cells):
        for j, (ky, kx) in enumerate(cells):
            dy, dx = max(-2, min(2, qy - ky)), max(-2, min(2, qx - kx))
            assert index[p + i, p + j] == (dy + 2) * 5 + (dx + 2)
    assert bool((index[:p, p:] == n - 3).all()) and bool((index[p:, :p] == n - 2).all())
    assert bool((index[:p, :p] == n - 1).all())


def test_timm_registers_are_kept_apart_from_the_more_registers():
    net = tiny_net("vit_small_patch14_reg4_dinov2")
    enc = net.encoder
    assert (enc.num_registers, enc.num_timm_registers, enc.num_classes, enc.num_prefix) == (R, 4, K, R + 4 + K)
    assert enc.cls_token.shape[1] == R + K and enc.reg_token.shape[1] == 4
    # no_embed_class: the class tokens start with a zero position embedding, the registers re-drawn
    assert torch.equal(enc.pos_embed[0, R:R + K], torch.zeros(K, enc.embed_dim))
    regs = enc.pos_embed.detach()[0, :R]
    assert float(regs.abs().max()) <= 2.0 and float(regs.std()) > 0.3


def test_a_family_that_cannot_host_prefix_tokens_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^backbone: 'samvit_base_patch16' cannot host MoRe's register and "
                                         r"class tokens: [^\n]*$"):
        MoReBackbone("samvit_base_patch16", num_classes=2, depth=1)
