"""Fidelity to the published code: evaluation protocols, initialization, augmentation, recipes.

Each test holds a case where the previous behaviour differs from the published one (a LAM with
negative values, a decoder case where averaging probabilities and max-of-summed-logits disagree,
an all-zero classifier output, ...), so it fails on that behaviour.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from more_fast import cam as C
from more_fast.model import MoReNet


def _tiny(num_classes=3, **kw):
    return MoReNet("vit_tiny_patch16_224", num_classes=num_classes, depth=2, decoder_dim=16, **kw).eval()


# ----------------------------------------------------------------------------- 1. LAM without ReLU
def _published_lam(model, x, scales):
    """The published multi_scale_lam2, written out: per scale the LAM of [x, flip x], resized to the
    input, elementwise max with the flipped-back twin (no ReLU); sum; per image and class min-max."""
    b, _, h, w = x.shape
    total, raw_min = 0, math.inf
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        feats = model.forward_features(torch.cat([xs, xs.flip(-1)]))
        q = model.graph_layer(feats.class_tokens, feats.patch_tokens)
        lam = torch.einsum("bnd,bkd->bkn", feats.patch_tokens, q).reshape(2 * b, -1, *feats.grid)
        lam = F.interpolate(lam, size=(h, w), mode="bilinear", align_corners=False)
        lam = torch.maximum(lam[:b], lam[b:].flip(-1))
        raw_min = min(raw_min, float(lam.min()))
        total = total + lam
    total = total - total.amin((-2, -1), keepdim=True)
    return total / (total.amax((-2, -1), keepdim=True) + 1e-5), raw_min


@pytest.mark.parametrize("reuse", [False, True])
def test_multiscale_lam_keeps_negative_values(reuse):
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    scales = (1.0, 0.5, 1.5)
    with torch.no_grad():
        expected, raw_min = _published_lam(model, x, scales)
        out = model(x)
        again = model.cams(out) + (C.lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid),)
    assert raw_min < -0.1  # the case where a ReLU changes the map
    maps = C.multiscale_maps(model, x, scales, with_lam=True, reuse=again if reuse else None)
    torch.testing.assert_close(maps["lam"], expected, rtol=0, atol=2e-5)
    # the CAM keeps its ReLU: with a ReLU'd sum the per-class min is >= 0 before normalization
    relu_cam = 0
    with torch.no_grad():
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(int(s * 64),) * 2, mode="bilinear", align_corners=False)
            cam = model.cams(model.forward_features(torch.cat([xs, xs.flip(-1)])))[0]
            cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
            relu_cam = relu_cam + F.relu(torch.maximum(cam[:2], cam[2:].flip(-1)))
    torch.testing.assert_close(maps["cam"], C.minmax_normalize(relu_cam), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- 4. register position embeddings
def _truncated_std(a=2.0):
    """Std of N(0, 1) cut at +-a: sqrt(1 - 2 a phi(a) / (Phi(a) - Phi(-a)))."""
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    return math.sqrt(1 - 2 * a * phi / mass)


def test_register_pos_embed_std_one_at_construction_and_from_pretrained():
    import timm
    from more_fast.model.pretrained import init_from_timm_state

    r = 8  # 8 x 192 draws: the sample std is within 0.03 of 0.88 with overwhelming probability
    net = MoReNet("vit_tiny_patch16_224", num_classes=3, num_registers=r, depth=1)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).state_dict()
    for when in ("constructed", "pretrained"):
        if when == "pretrained":
            init_from_timm_state(net.encoder, state)
        regs = net.encoder.pos_embed.detach()[:, :r]
        assert abs(float(regs.std()) - _truncated_std()) < 0.06, when  # std 0.02 before
        assert float(regs.abs().max()) <= 2.0 and float(regs.abs().max()) > 1.5, when
        # the class tokens' position embeddings stay copies of the class token's
        cls_pos = net.encoder.pos_embed.detach()[:, r:r + 3]
        assert torch.equal(cls_pos, cls_pos[:, :1].expand_as(cls_pos)), when


# ----------------------------------------------------------------------------- 5. colour jitter
def test_colour_jitter_is_the_published_one_with_p_half():
    from torchvision.transforms import v2

    from more_fast.data.transforms import train_transform

    steps = train_transform(32).transforms
    applies = [t for t in steps if isinstance(t, v2.RandomApply)]
    assert len(applies) == 1 and applies[0].p == 0.5
    (jitter,) = applies[0].transforms
    assert isinstance(jitter, v2.ColorJitter)
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))


# ----------------------------------------------------------------------------- 11. L_reg's effective weight
def test_reg_loss_is_lattice_gain_times_exact_energy():
    from more_fast import losses as L

    assert L.LATTICE_GAIN == 0.58
    torch.manual_seed(3)
    image = torch.rand(2, 3, 12, 10) * 255
    logits = torch.randn(2, 4, 12, 10, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 12, 10))
    labels[:, :4] = 255
    loss = L.reg_loss(image, logits.float(), labels, 0.5, 15.0, 100.0)  # the VOC recipe's
    # the energy by its definition, at half resolution, over all pixel pairs (p = q included)
    img = F.interpolate(image.double(), size=(6, 5), mode="nearest")
    s = F.interpolate(logits.softmax(1), size=(6, 5), mode="bilinear", align_corners=False)
    lab = F.interpolate(labels[:, None].double(), size=(6, 5), mode="nearest")[:, 0]
    gate = torch.where(lab == 255, torch.ones_like(lab), (1 - s.detach().amax(1)).clamp_min(0)).flatten(1)
    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij")
    xy = torch.stack([yy, xx], -1).reshape(-1, 2).double()
    energy = 0
    for b in range(2):
        rgb = img[b].reshape(3, -1).T
        w = torch.exp(-torch.cdist(xy, xy) ** 2 / (2 * 50.0 ** 2) - torch.cdist(rgb, rgb) ** 2 / (2 * 15.0 ** 2))
        sb = s[b].reshape(4, -1)
        energy = energy - (sb * gate[b] * (sb @ w)).sum() / 2
    assert loss.item() == pytest.approx(1e-7 * 0.58 * energy.item(), rel=1e-4)  # 1e-7 * E before
    loss.backward()
    g_gain = logits.grad.clone()
    logits.grad = None
    L.reg_loss(image, logits.float(), labels, 0.5, 15.0, 100.0, gain=1.0).backward()
    torch.testing.assert_close(g_gain, 0.58 * logits.grad, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- 8. L_ure sampling fallback
def _chosen(labels, seed=0):
    from more_fast import losses as L

    g = torch.Generator().manual_seed(seed)
    index, valid = L.ure_sample(labels, torch.rand(labels.shape[0], labels[0].numel(), generator=g))
    return [sorted(index[b][valid[b]].tolist()) for b in range(labels.shape[0])]


def test_ure_sample_fallback_to_random_patches_inside_the_window_range():
    w = 8
    inner = {r * w + c for r in range(3, 6) for c in range(3, 6)}  # 6 x 6 windows fit around rows/cols 3..5
    # all background: no candidate, no foreground -> (8 - 0) // 4 = 2 random patches of the inner range
    labels = torch.zeros(3, 8, 8, dtype=torch.long)
    # one foreground patch inside the range: fewer than the 2 needed -> the random fallback again
    labels[1, 4, 4] = 1
    # foreground only where no window fits (the border): not eligible -> the random fallback
    labels[2, 0, :] = 2
    for seed in range(5):
        for picked in _chosen(labels, seed):
            assert len(picked) == 2 and set(picked) <= inner, picked


def test_ure_sample_foreground_inside_the_range_and_counts():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 3:6, 3:6] = 3  # 9 foreground patches in the inner range
    labels[:, 0, :] = 3  # and a border row of foreground: never picked
    labels[1] = 1
    labels[1, 3:6, 3:6] = 255  # image 1: 9 uncertain patches amid foreground, all candidates: 8 of them
    fg = {r * 8 + c for r in range(3, 6) for c in range(3, 6)}
    for seed in range(5):
        a, b = _chosen(labels, seed)
        assert len(a) == 2 and set(a) <= fg  # (8 - 0) // 4 foreground patches, inside the range
        assert len(b) == 8 and set(b) <= fg
    # 4 candidates -> (8 - 4) // 4 = 1 extra foreground patch; 7 candidates -> none
    spots = [(3, 3), (3, 6), (3, 9), (6, 3), (6, 6), (6, 9), (9, 3)]
    for n_cand, extra in ((4, 1), (7, 0)):
        lab = torch.ones(1, 13, 13, dtype=torch.long)  # foreground everywhere
        for r, c in spots[:n_cand]:
            lab[0, r, c] = 255
        picked = _chosen(lab)[0]
        got_cand = sorted(i for i in picked if lab[0].flatten()[i] == 255)
        assert got_cand == sorted(r * 13 + c for r, c in spots[:n_cand]) and len(picked) == n_cand + extra


# ----------------------------------------------------------------------------- 6. decoder under AdamW in warm-up
def test_decoder_is_stepped_and_decayed_by_adamw_before_l_seg_on_one_process():
    from more_fast.training import TrainConfig
    from more_fast.training.loop import TrainStep, loss_weights

    cfg = TrainConfig(num_classes=3, crop_size=32, batch_size=2, depth=2, decoder_dim=16, kernels="reference",
                      cam_scales=(1.0,))
    assert "seg" not in loss_weights(cfg, 0)
    model = _tiny().train()
    step = TrainStep(model, cfg, torch.device("cpu"))
    assert not step.ddp
    decoder = step.optimizer.param_groups[4]
    assert decoder["name"] == "decoder"
    decoder["lr"], decoder["weight_decay"] = 0.1, 0.5  # so that one step's decay is visible
    before = [p.detach().clone() for p in model.decoder.parameters()]
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    step.step(0, batch)
    for p, old in zip(model.decoder.parameters(), before):
        state = step.optimizer.state[p]
        assert int(state["step"]) == 1 and not state["exp_avg"].any()  # a zero gradient, counted
        torch.testing.assert_close(p.detach(), old * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)  # decoupled decay only


# ----------------------------------------------------------------------------- 7, 9. recipes and the run header
def _header(cfg, world=1):
    from types import SimpleNamespace

    from more_fast.training.loop import Trainer

    lines = []
    Trainer._log_schedule(SimpleNamespace(cfg=cfg, world=world, log=lines.append))
    return "\n".join(lines)


def test_voc_recipe_background_half_and_pinned_weights_in_the_header():
    from more_fast.training import VOC_RECIPE, TrainConfig

    cfg = TrainConfig(**VOC_RECIPE)
    assert cfg.eval_bkg == 0.5 and cfg.cam_high == 0.7  # validation background 0.45 before
    assert cfg.pretrained == "timm:vit_base_patch16_224.orig_in21k_ft_in1k"
    head = _header(cfg)
    assert "validation background 0.5," in head and "high threshold 0.7," in head
    assert "pretrained timm:vit_base_patch16_224.orig_in21k_ft_in1k" in head
    assert "batch 4 (1 x 4)" in head and "CAM scales (1.0, 0.5, 0.75, 1.5)" in head
    assert "L_ptc from 0, L_cre/L_ure from 0 (" in head  # VOC: from the first iteration


def test_coco_recipe_is_the_published_coco_run_and_printed():
    from more_fast.training import COCO_RECIPE, TrainConfig

    cfg = TrainConfig(**COCO_RECIPE)
    assert (cfg.iters, cfg.total_iters, cfg.batch_size) == (80000, 80000, 8)
    assert cfg.cam_scales == (1.0, 0.5, 0.75, 1.25, 1.5)
    assert (cfg.scaled("ptc_start"), cfg.scaled("lir_start"), cfg.scaled("seg_start")) == (8000, 12000, 16000)
    assert cfg.scaled("label_switch") == 50000  # 40,000 before
    assert (cfg.cam_high, cfg.eval_bkg, cfg.w_cre, cfg.w_ure, cfg.cre_temperature) == (0.65, 0.45, 0.05, 0.0, 0.1)
    head = _header(cfg)
    for text in ("80000 iterations", "batch 8 (1 x 8)", "CAM scales (1.0, 0.5, 0.75, 1.25, 1.5)",
                 "L_ptc after 8000", "L_cre/L_ure after 12000 (w_cre 0.05, w_ure 0.0, temperature 0.1)",
                 "L_seg/L_reg after 16000", "LIR labels from the CAM after 50000", "high threshold 0.65,",
                 "validation background 0.45,", "pretrained timm:vit_base_patch16_224.orig_in21k_ft_in1k"):
        assert text in head, (text, head)
    assert "batch 8 (2 x 4)" in _header(TrainConfig(**dict(COCO_RECIPE, batch_size=4)), world=2)


def test_high_threshold_reaches_the_aux_cam_labels_and_par(monkeypatch):
    from more_fast.training import TrainConfig
    from more_fast.training.loop import TrainStep

    seen = []
    real_labels, real_par = C.cam_labels, C.par_pseudo_labels

    def cam_labels(cam, cls, hi, lo):
        seen.append(("labels", hi, lo))
        return real_labels(cam, cls, hi, lo)

    def par_pseudo_labels(image, cam, cls, hi, lo, storage):
        seen.append(("par", hi))
        return real_par(image, cam, cls, hi, lo, storage)

    monkeypatch.setattr(C, "cam_labels", cam_labels)
    monkeypatch.setattr(C, "par_pseudo_labels", par_pseudo_labels)
    cfg = TrainConfig(num_classes=3, crop_size=32, batch_size=2, depth=2, decoder_dim=16, kernels="reference",
                      cam_scales=(1.0,), cam_high=0.65)
    step = TrainStep(_tiny().train(), cfg, torch.device("cpu"))
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    step.step(cfg.scaled("seg_start") + 1, batch)
    assert ("labels", 0.65, 0.25) in seen and ("par", 0.65) in seen and ("labels", 0.7, 0.25) not in seen


def test_validation_uses_the_recipe_background(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from more_fast.training import VOC_RECIPE, TrainConfig
    from more_fast.training import loop

    got = {}
    monkeypatch.setattr(loop, "evaluate", lambda model, loader, k, device, scales, bkg, **kw: got.update(bkg=bkg) or {})
    monkeypatch.setattr(loop, "eval_loader", lambda *a, **kw: contextlib.nullcontext())  # the loader is a context manager
    monkeypatch.setattr(loop, "format_table", lambda results, it: "")
    cfg = TrainConfig(**dict(VOC_RECIPE, out=str(tmp_path)))
    fake = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), model=None, val_set=None, rank=0, world=1, workers=0,
                           is_main=False, out=tmp_path, train_step=SimpleNamespace(amp_dtype=None, features=None),
                           tb=SimpleNamespace(panels=lambda *a: None, record=lambda r: None),
                           log=lambda m: None, _write_metrics=lambda r: None)
    loop.Trainer._evaluate(fake, 1)  # evaluate() only adds the backend context
    assert got["bkg"] == 0.5


# ----------------------------------------------------------------------------- 10. pinned pretrained weights
def test_timm_tag_offline_fails_at_once_with_one_line(monkeypatch):
    from more_fast.model import pretrained as CK
    from more_fast.cli import config_from_args

    monkeypatch.setattr(CK, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(CK, "_timm_cached_file", lambda tag: None)
    tag = "vit_base_patch16_224.orig_in21k_ft_in1k"
    with pytest.raises(ValueError) as err:
        CK.pretrained_state_dict(f"timm:{tag}")
    msg = str(err.value)
    assert "\n" not in msg and f"timm:{tag}" in msg and ".pth" in msg and ".safetensors" in msg
    assert "jx_vit_base_p16_224-80ecf9dd.pth" in msg
    with pytest.raises(ValueError, match="no pretrained weights tagged 'vit_nonesuch.x'"):
        CK.check_pretrained("timm:vit_nonesuch.x")
    # the recipe's default fails at parse time, naming the flag, before any data is read
    with pytest.raises(SystemExit) as exit_:
        config_from_args(["--data", "voc", "--data-root", "."])
    assert exit_.value.code == 2


def test_timm_tag_reads_the_cache_and_local_files_still_work(monkeypatch, tmp_path):
    import timm
    from safetensors.torch import save_file

    from more_fast.model import pretrained as CK

    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    # a cached copy: loaded through timm from the file, no network needed
    monkeypatch.setattr(CK, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(CK, "_timm_cached_file", lambda tag: str(path))
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: real_create(name, depth=1, **kw))
    state = CK.pretrained_state_dict("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    for key, value in tiny.state_dict().items():
        assert torch.equal(state[key], value), key
    torch.save(tiny.state_dict(), tmp_path / "w.pth")
    for local in (tmp_path / "w.pth", path):
        CK.check_pretrained(str(local))
        assert torch.equal(CK.pretrained_state_dict(str(local))["pos_embed"], tiny.pos_embed)
    with pytest.raises(ValueError, match="no such file"):
        CK.check_pretrained(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------- 2. decoder protocol
def _pair(x_logits, flip_logits):
    return torch.tensor([x_logits, flip_logits], dtype=torch.float32)[:, :, None, None]  # 2 x C x 1 x 1


def test_decoder_max_of_flip_summed_logits_where_averaging_disagrees():
    from more_fast.protocols import decoder_scores

    # scale 1 is sure of class 1; scales 2 and 3 lean to class 2: the max of the summed logits
    # says 1 (6 > 5), the mean probability says 2 (0.59 > 0.35)
    seg_logits = [_pair([0, 3, 0], [0, 3, 0]), _pair([0, 0, 2.5], [0, 0, 2.5]), _pair([0, 0, 2.5], [0, 0, 2.5])]
    published = decoder_scores(seg_logits, 0, (1, 1))
    torch.testing.assert_close(published[:, 0, 0], torch.tensor([0.0, 6.0, 5.0]))
    assert int(published.argmax(0)) == 1
    mean = decoder_scores(seg_logits, 0, (1, 1), "mean_prob")
    assert int(mean.argmax(0)) == 2 and float(mean.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="decoder_protocol"):
        decoder_scores(seg_logits, 0, (1, 1), "average")


def test_decoder_scores_resize_each_pass_to_the_image_and_flip_back():
    from more_fast.protocols import decoder_scores

    b, size = 2, (7, 9)
    seg_logits = [torch.randn(2 * b, 4, 3, 3), torch.randn(2 * b, 4, 4, 4)]
    for i in range(b):
        per_scale = []
        for logits in seg_logits:  # the published loop, per image: resize [x, flip x], sum, then max
            segs = F.interpolate(logits[[i, b + i]], size=size, mode="bilinear", align_corners=False)
            per_scale.append(segs[:1] + segs[1:].flip(-1))
        expected = torch.max(torch.stack(per_scale), dim=0)[0][0]
        torch.testing.assert_close(decoder_scores(seg_logits, i, size), expected, rtol=0, atol=1e-6)


def _samples(sizes, k=3):
    g = torch.Generator().manual_seed(5)
    out = []
    for n, (h, w) in enumerate(sizes):
        out.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                    "mask": torch.randint(0, k + 1, (h, w), generator=g), "cls_label": torch.tensor([1.0, 0, 0]),
                    "name": f"im{n}"})
    return out


def test_evaluate_published_decoder_matches_the_published_loop():
    from more_fast.data import normalize
    from more_fast.protocols import evaluate_published

    model = _tiny()
    samples = _samples([(40, 56), (64, 48)])
    saved = {}
    evaluate_published(model, [samples], torch.device("cpu"), 64, cam_scales=(1.0,), save_map="decoder",
                       save=lambda name, label: saved.update({name: label}))
    with torch.no_grad():
        for s in samples:
            size = tuple(s["mask"].shape)
            inputs = normalize(s["image"])[None]  # the published script: the original image, normalized
            per_scale = []
            for sc in (1.0, 1.25, 1.5):
                xs = F.interpolate(inputs, size=[int(64 * sc)] * 2, mode="bilinear", align_corners=False)
                segs = F.interpolate(model(torch.cat([xs, xs.flip(-1)])).seg, size=size, mode="bilinear",
                                     align_corners=False)
                per_scale.append(segs[:1] + segs[1:].flip(-1))
            expected = torch.max(torch.stack(per_scale), dim=0)[0].argmax(1)[0]
            assert (torch.from_numpy(saved[s["name"]]).long() == expected).float().mean() > 0.999


# ----------------------------------------------------------------------------- 3. LAM label fallback
def test_image_labels_fall_back_to_decoder_classes_with_five_patches():
    from more_fast.protocols import image_labels_with_fallback

    seg = torch.zeros(2, 4, 4, 4)  # B = 2, K = 3, 4 x 4 grid; background wins where nothing is set
    seg[:, 2, 0, :] = 1.0
    seg[:, 2, 1, 0] = 1.0  # class index 1 (label 2): 5 patches -> kept
    seg[:, 3, 3, :] = 1.0  # class index 2 (label 3): 4 patches -> dropped
    logits = torch.zeros(2, 3)  # an all-zero classifier output: no class predicted
    logits[1, 0] = 2.0  # image 1 has a prediction: it keeps it
    labels = image_labels_with_fallback(logits, seg)
    assert labels.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_evaluate_published_all_zero_classifier_uses_the_decoder_classes():
    from more_fast.protocols import evaluate_published, network_input

    model = _tiny()
    torch.nn.init.zeros_(model.classifier.weight)  # logits 0: sigmoid 0.5, no class predicted
    samples = _samples([(40, 56), (64, 48)])
    with torch.no_grad():
        seg = model(network_input([s["image"] for s in samples], 64, torch.device("cpu"))).seg  # 4 x 4 grid
    counts = F.one_hot(seg.argmax(1), 4).sum((1, 2))[:, 1:]
    expected = float((counts >= 5).sum()) / 2
    assert expected > 0  # the case where "no class" (all background) differs
    got = evaluate_published(model, [samples], torch.device("cpu"), 64, cam_scales=(1.0,))
    assert got["labelled_classes"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- 12. training-time validation maps
def test_training_validation_lam_labels_use_the_unrelu_lam_and_the_given_background():
    from more_fast.data import normalize
    from more_fast.training.evaluate import predict

    model = _tiny()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    cls = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    scales = (1.0, 0.5)
    with torch.no_grad():
        lam, raw_min = _published_lam(model, normalize(images), scales)
    assert raw_min < 0
    pred = predict(model, images, cls, scales, 0.5)
    torch.testing.assert_close(pred["maps"]["lam"], lam, rtol=0, atol=2e-5)
    scores = torch.cat([torch.full_like(lam[:, :1], 0.5), lam * cls[:, :, None, None]], dim=1)
    assert (pred["lam"] == scores.argmax(1)).float().mean() > 0.999


def test_resume_needs_no_fetch_of_the_recipe_weights(monkeypatch, tmp_path):
    from more_fast.model import pretrained as CK
    from more_fast.cli import config_from_args

    monkeypatch.setattr(CK, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(CK, "_timm_cached_file", lambda tag: None)
    cfg = config_from_args(["--data", "voc", "--data-root", str(tmp_path), "--resume", str(tmp_path)])
    assert cfg.pretrained is None and cfg.resume == str(tmp_path)


def test_pretrained_none_trains_from_scratch_under_a_recipe(tmp_path):
    from more_fast.cli import config_from_args

    cfg = config_from_args(["--data", "voc", "--data-root", str(tmp_path), "--pretrained", "none"])
    assert cfg.pretrained is None
    cfg = config_from_args(["--data", "voc", "--data-root", str(tmp_path), "--pretrained", "NONE"])
    assert cfg.pretrained is None


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_par_affinity_storage_reaches_par_and_config_json(monkeypatch, tmp_path, storage):
    """TrainConfig.par_affinity (fp32 by default: the published refinement) is what PAR stores, and
    config.json records it; `--set par_affinity=bf16` is how a run asks for bf16."""
    import json

    import kernels
    from more_fast.cli import config_from_args
    from more_fast.training import TrainConfig
    from more_fast.training.loop import TrainStep

    assert TrainConfig().par_affinity == "fp32"
    seen = []
    real = kernels.par_refine

    def par_refine(*args, **kw):
        seen.append(args[4] if len(args) > 4 else kw.get("affinity_storage", "fp32"))
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "par_refine", par_refine)
    cfg = TrainConfig(num_classes=3, crop_size=32, batch_size=2, depth=2, decoder_dim=16, kernels="reference",
                      cam_scales=(1.0,), par_affinity=storage)
    step = TrainStep(_tiny().train(), cfg, torch.device("cpu"))
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    step.step(cfg.scaled("seg_start") + 1, batch)
    assert seen == [storage]
    parsed = config_from_args(["--set", f"par_affinity={storage}", "--out", str(tmp_path)])
    assert parsed.par_affinity == storage and json.loads(json.dumps(parsed.to_dict()))["par_affinity"] == storage


def test_the_recipe_reaches_the_losses(monkeypatch):
    """L_reg's scale and sigmas, the LIR / aux-CAM label thresholds and L_cre's temperature come
    from TrainConfig (defined once there), not from defaults deeper down."""
    import kernels
    from more_fast.training import TrainConfig
    from more_fast.training.loop import TrainStep

    seen = {}
    real_energy, real_labels, real_lir = kernels.dense_energy_loss, C.cam_labels, kernels.lir_loss

    def energy(image, probs, gate, sigma_rgb, sigma_xy):
        seen["energy"] = (tuple(image.shape[-2:]), sigma_rgb, sigma_xy)
        return real_energy(image, probs, gate, sigma_rgb, sigma_xy)

    def cam_labels(cam, cls, hi, lo):
        seen.setdefault("labels", []).append((hi, lo))
        return real_labels(cam, cls, hi, lo)

    def lir(cls_tokens, patch_tokens, labels, cls_labels, temperature):
        seen["temperature"] = temperature
        return real_lir(cls_tokens, patch_tokens, labels, cls_labels, temperature)

    monkeypatch.setattr(kernels, "dense_energy_loss", energy)
    monkeypatch.setattr(kernels, "lir_loss", lir)
    monkeypatch.setattr(C, "cam_labels", cam_labels)
    cfg = TrainConfig(num_classes=3, crop_size=32, batch_size=2, depth=2, decoder_dim=16, kernels="reference",
                      cam_scales=(1.0,), reg_scale=0.75, reg_sigma_rgb=11.0, reg_sigma_xy=40.0, cam_high=0.8,
                      cam_low=0.2, cre_high=0.55, lir_high=0.65, lir_low=0.3, cre_temperature=0.25)
    step = TrainStep(_tiny().train(), cfg, torch.device("cpu"))
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    step.step(cfg.scaled("seg_start") + 1, batch)  # the decoder's terms on, the labels from the aux CAM
    assert seen["energy"] == ((24, 24), 11.0, 0.75 * 40.0)
    assert seen["temperature"] == 0.25
    assert (0.8, 0.2) in seen["labels"] and (0.55, 0.2) in seen["labels"]
    seen.clear()
    step.step(cfg.scaled("label_switch") + 1, batch)  # the LIR labels from the CAM
    assert (0.65, 0.3) in seen["labels"] and (0.55, 0.2) not in seen["labels"]
