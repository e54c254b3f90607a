"""The training loop: schedule, parameter groups, loss phases, end-to-end steps, metrics, resume, CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kernels
from more_fast.cli import config_from_args
from more_fast.model import MoReNet
from more_fast.training import TrainConfig, Trainer, build_optimizer, build_scheduler, loss_weights, lr_factor
from more_fast.training.loop import TrainStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(tmp_path, **kw):
    base = dict(data="synthetic", data_root=str(tmp_path / "syn"), synthetic_train=8, synthetic_val=4,
                num_classes=3, crop_size=32, batch_size=2, backbone="vit_tiny_patch16_224", depth=3,
                decoder_dim=16, iters=2, log_every=1, eval_every=1000, workers=0, out=str(tmp_path / "out"),
                cam_scales=(1.0, 0.5), num_panels=2, kernels="reference")
    base.update(kw)
    return TrainConfig(**base)


def test_lr_factor_warmup_and_poly():
    assert lr_factor(0, 1500, 20000) == pytest.approx(1e-6)
    assert lr_factor(750, 1500, 20000) == pytest.approx(0.5 + 0.5e-6)
    assert lr_factor(1500, 1500, 20000) == pytest.approx((1 - 1500 / 20000) ** 0.9)
    assert lr_factor(20000, 1500, 20000) == 0.0


def test_optimizer_groups_and_schedule(tmp_path):
    cfg = TrainConfig(backbone_lr=6e-5, head_lr=6e-4, iters=20000, recipe_iters=20000)
    model = MoReNet("vit_tiny_patch16_224", num_classes=4, depth=3, decoder_dim=16)
    opt = build_optimizer(model, cfg)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["backbone", "backbone_norm", "classifiers", "gcr", "decoder"]
    assert [g["lr"] for g in opt.param_groups] == [6e-5, 6e-5, 6e-4, 6e-4, 6e-4]
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups) and opt.defaults["betas"] == (0.9, 0.999)
    sched = build_scheduler(opt, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * 1e-6)
    for _ in range(1500):
        sched.step()
    assert opt.param_groups[2]["lr"] == pytest.approx(6e-4 * (1 - 1500 / 20000) ** 0.9)


def test_loss_phases_voc_and_scaled():
    voc = TrainConfig(iters=20000, recipe_iters=20000)
    assert set(loss_weights(voc, 2000)) == {"cls", "aux", "mct", "ptc", "cre", "ure"}
    w = loss_weights(voc, 2001)
    assert w["seg"] == 0.12 and w["reg"] == 0.05 and w["cre"] == 0.2 and w["ure"] == 0.1 and w["ptc"] == 0.3
    short = TrainConfig(iters=400, recipe_iters=400)
    assert short.scaled("seg_start") == 40 and short.scaled("label_switch") == 200
    assert "seg" in loss_weights(short, 41) and "seg" not in loss_weights(short, 40)
    coco = TrainConfig(iters=80000, recipe_iters=80000, reference_iters=80000, ptc_start=8000, lir_start=12000,
                       seg_start=16000)
    assert set(loss_weights(coco, 7999)) == {"cls", "aux", "mct"}
    assert "cre" in loss_weights(coco, 12001) and "seg" not in loss_weights(coco, 16000)


# The published train scripts loop `for n_iter in range(max_iters)` and switch phases with `<=`:
# COCO `if n_iter <= 8000: (no L_ptc) elif n_iter <= 12000: (no L_cre / L_ure) elif n_iter <= 16000:
# (no L_seg / L_reg)`, VOC `if n_iter <= 2000: (no L_seg / L_reg)` with L_ptc, L_cre, L_ure from the
# first iteration, and `mask = aux if n_iter <= switch else cam` (10,000 VOC, 50,000 COCO). `it` is
# that n_iter; each threshold at its boundary iteration:
@pytest.mark.parametrize("term,start,names", [("ptc", 8000, {"ptc"}), ("lir", 12000, {"cre", "ure"}),
                                              ("seg", 16000, {"seg", "reg"})])
def test_coco_phase_boundaries_are_the_published_comparisons(term, start, names):
    from more_fast.training import COCO_RECIPE

    coco = TrainConfig(**dict(COCO_RECIPE, w_ure=0.1))  # the published run's w_ure 0 leaves L_ure out altogether
    assert coco.scaled(f"{term}_start") == start
    assert not names & set(loss_weights(coco, start))  # n_iter <= start: not yet
    assert names <= set(loss_weights(coco, start + 1))  # n_iter > start: on
    assert names <= set(loss_weights(coco, start + 1000))


def test_voc_phase_boundaries_ptc_and_lir_from_the_first_iteration():
    voc = TrainConfig(iters=20000, recipe_iters=20000)
    assert (voc.ptc_start, voc.lir_start) == (0, 0)
    assert set(loss_weights(voc, 0)) == {"cls", "aux", "mct", "ptc", "cre", "ure"}
    assert "seg" not in loss_weights(voc, 2000) and "seg" in loss_weights(voc, 2001)
    # a scaled COCO start of 0 means the same: from the first iteration; 1 means from iteration 2
    from more_fast.training import COCO_RECIPE

    short = TrainConfig(**dict(COCO_RECIPE, iters=5, schedule_iters=5))
    assert short.scaled("ptc_start") == 0 and "ptc" in loss_weights(short, 0)
    short = TrainConfig(**dict(COCO_RECIPE, iters=15, schedule_iters=15))
    assert short.scaled("ptc_start") == 2
    assert "ptc" not in loss_weights(short, 2) and "ptc" in loss_weights(short, 3)


@pytest.mark.parametrize("switch", [3, 5])
def test_lir_label_switch_at_the_published_iteration(monkeypatch, switch):
    from more_fast.training import loop

    seen = []
    real = loop.cam.cam_labels

    def cam_labels(cam, cls, hi, lo):
        seen.append((hi, lo))
        return real(cam, cls, hi, lo)

    monkeypatch.setattr(loop.cam, "cam_labels", cam_labels)
    cfg = TrainConfig(num_classes=3, crop_size=32, batch_size=2, depth=2, decoder_dim=16, kernels="reference",
                      cam_scales=(1.0,), iters=20, recipe_iters=20, reference_iters=20, label_switch=switch)
    model = MoReNet("vit_tiny_patch16_224", num_classes=3, depth=2, decoder_dim=16).train()
    step = TrainStep(model, cfg, torch.device("cpu"))
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    for it, source in [(switch - 1, "aux"), (switch, "aux"), (switch + 1, "cam")]:
        seen.clear()
        step.step(it, batch)
        aux_cre, cam_cre = (0.5, 0.25) in seen, (0.6, 0.35) in seen  # labels(aux CAM, 0.5, 0.25) / labels(CAM, 0.6, 0.35)
        assert (aux_cre, cam_cre) == (source == "aux", source == "cam"), (it, seen)


def _read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_four_iterations_end_to_end_with_the_decoder(tmp_path, backend, monkeypatch):
    if backend == "triton":
        missing = [op for op in ("affinity_loss", "lir_loss", "gcr_aggregate", "par_refine", "dense_energy_loss")
                   if not kernels.triton_available(op)]
        assert not missing, f"Triton implementations missing: {missing}"
    # schedule of 20 so that L_seg / L_reg (after iteration 2) and PAR run within the four steps
    cfg = tiny_cfg(tmp_path, kernels=backend, schedule_iters=20, iters=4, eval_every=4, seg_start=2000)
    results = Trainer(cfg, log=lambda m: None).run()
    records = _read_metrics(cfg.out)
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert all(k in r for k in ("cls", "aux", "mct", "ptc", "cre", "ure")) and r["loss"] > 0
    assert "seg" in steps[-1] and "reg" in steps[-1]  # the decoder joined after iteration 2
    assert set(results) == {"cam", "aux_cam", "lam", "decoder", "background"}
    assert os.path.isfile(os.path.join(cfg.out, "checkpoints", "ckpt_00000004.pt"))
    assert len(os.listdir(os.path.join(cfg.out, "panels", "iter_00000004"))) == 2


def test_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    # on the CPU, as the README promises it: CUDA's bilinear backward adds with atomics
    cpu = dict(schedule_iters=20, device="cpu")
    full = tiny_cfg(tmp_path, iters=4, out=str(tmp_path / "full"), **cpu)
    Trainer(full, log=lambda m: None).run()
    half = tiny_cfg(tmp_path, iters=2, out=str(tmp_path / "half"), **cpu)
    Trainer(half, log=lambda m: None).run()
    resumed = tiny_cfg(tmp_path, iters=4, out=str(tmp_path / "half"), resume=str(tmp_path / "half"), **cpu)
    Trainer(resumed, log=lambda m: None).run()
    assert_same_final_state(tmp_path / "full", tmp_path / "half", 4)


# what a resumed run must reproduce exactly; "config" differs (out, resume) and "best" legitimately
# differs (the interrupted run also evaluated where it stopped)
RESUME_STATE = ("model", "optimizer", "scheduler", "rng", "ure_generator", "iteration", "skipped")


def assert_same_final_state(a, b, iteration):
    from more_fast.training.state import checkpoint_path, diff_states

    sa, sb = (torch.load(checkpoint_path(p, iteration), weights_only=False) for p in (a, b))
    assert sa["iteration"] == iteration
    differ = diff_states({k: sa[k] for k in RESUME_STATE}, {k: sb[k] for k in RESUME_STATE})
    assert not differ, f"final checkpoints differ at {differ[:10]}"


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, iters=2, eval_every=1, num_panels=0, cam_scales=(1.0,))
    Trainer(cfg, log=lambda m: None).run()
    ckpts = sorted(os.listdir(os.path.join(cfg.out, "checkpoints")))
    assert ckpts == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    with open(os.path.join(cfg.out, "checkpoints", ckpts[-1]), "r+b") as f:
        f.truncate(100)
    t = Trainer(tiny_cfg(tmp_path, iters=2, resume=cfg.out, num_panels=0, cam_scales=(1.0,)), log=lambda m: None)
    assert t.start_iter == 1
    assert "ckpt_00000002.pt" in capsys.readouterr().err


def test_model_and_losses_compile_without_graph_break(tmp_path):
    torch._dynamo.reset()
    cfg = tiny_cfg(tmp_path, compile=True, cam_scales=(1.0,))
    model = MoReNet("vit_tiny_patch16_224", num_classes=3, depth=3, decoder_dim=16)
    step = TrainStep(model, cfg, torch.device("cpu"))  # fullgraph=True: a graph break raises
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]])}
    total, terms = step.step(cfg.scaled("seg_start") + 1, batch)  # past the seg start: every loss term is in the graph
    assert set(terms) == {"cls", "aux", "mct", "ptc", "cre", "ure", "seg", "reg"} and torch.isfinite(total)


def test_cli_rejects_bad_values_before_work(tmp_path):
    bad = [["--crop-size", "30"], ["--iters", "0"], ["--data", "voc"], ["--pretrained", str(tmp_path / "no.pth")],
           ["--resume", str(tmp_path / "missing")], ["--kernels", "cuda"], ["--num-classes", "9"]]
    for argv in bad:
        with pytest.raises(SystemExit) as err:
            config_from_args(argv)
        assert err.value.code == 2, argv
    weights = tmp_path / "vit.pth"  # the recipe's default, timm:<tag>, may need a network: a local file instead
    weights.touch()
    cfg = config_from_args(["--data", "voc", "--data-root", str(tmp_path), "--pretrained", str(weights)])
    assert cfg.num_classes == 20 and cfg.crop_size == 448 and cfg.batch_size == 4 and cfg.iters == 20000
    assert cfg.backbone == "vit_base_patch16_224" and cfg.backbone_lr == 6e-5 and cfg.head_lr == 6e-4


def test_train_script_error_message_names_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--crop-size", "30"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--crop-size" in proc.stderr and "multiple of the patch size 8" in proc.stderr  # the synthetic recipe's patch


def test_nonfinite_loss_stops_naming_term_and_iteration(tmp_path, monkeypatch):
    import more_fast.losses as L
    from more_fast.training import NonFiniteLoss

    real = L.ure_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(L, "ure_loss", poisoned)
    cfg = tiny_cfg(tmp_path, iters=4, eval_every=2, num_panels=0, cam_scales=(1.0,))
    with pytest.raises(NonFiniteLoss, match=r"'ure'.*iteration 3.*ckpt_00000002\.pt"):
        Trainer(cfg, log=lambda m: None).run()
    assert sorted(os.listdir(os.path.join(cfg.out, "checkpoints"))) == ["ckpt_00000002.pt"]


def test_nonfinite_loss_skip_mode_counts_and_goes_on(tmp_path, monkeypatch):
    import more_fast.losses as L

    real = L.ure_loss
    monkeypatch.setattr(L, "ure_loss", lambda *a: real(*a) * float("nan"))
    cfg = tiny_cfg(tmp_path, iters=2, num_panels=0, cam_scales=(1.0,), on_nonfinite="skip")
    t = Trainer(cfg, log=lambda m: None)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.run()
    assert t.train_step.skipped == 2
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert _read_metrics(cfg.out)[-2]["skipped"] == 2


@pytest.mark.gpu
def test_cuda_training_step_has_no_host_sync(tmp_path):
    """No device-to-host transfer or synchronization inside a (non-logging) step.

    torch.cuda.set_sync_debug_mode("error") raises on every synchronizing CUDA call (item(),
    nonzero, a blocking copy to the host, ...) made while it is on."""
    cfg = tiny_cfg(tmp_path, device="cuda", kernels="auto", amp=True)
    device = torch.device("cuda")
    model = MoReNet("vit_tiny_patch16_224", num_classes=3, depth=3, decoder_dim=16).to(device)
    step = TrainStep(model, cfg, device)
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).pin_memory(),
             "cls_label": torch.tensor([[1.0, 0, 1], [0, 1, 0]]).pin_memory()}
    it = cfg.scaled("seg_start") + 1  # every loss, PAR and the energy kernel run
    step.step(it, batch)  # first call: kernel compilation and allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, terms = step.step(it + 1, batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(terms) == {"cls", "aux", "mct", "ptc", "cre", "ure", "seg", "reg"}
    assert torch.isfinite(total).item()
