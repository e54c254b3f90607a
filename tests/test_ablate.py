"""Ablations: --set FIELD=VALUE, the GCR and LIR switches, scripts/ablate.py and scripts/plot_metrics.py."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from more_fast.cli import config_from_args
from more_fast.model import MoReNet
from more_fast.training import TrainConfig, loss_weights
from more_fast.losses import compute_losses
from more_fast.training.loop import differs_from_recipe

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ --set
def test_set_parses_each_field_type():
    cfg = config_from_args(["--set", "gcr=off", "--set", "w_cre=0", "--set", "cam_scales=1,0.5,0.75",
                            "--set", "depth=none", "--set", "batch_size=3", "--set", "gcr_score=dot",
                            "--set", "amp=on", "--set", "split_list=none", "--set", "head_lr=1e-3"])
    assert cfg.gcr is False and cfg.w_cre == 0.0 and isinstance(cfg.w_cre, float)
    assert cfg.cam_scales == (1.0, 0.5, 0.75) and cfg.depth is None
    assert cfg.batch_size == 3 and isinstance(cfg.batch_size, int)
    assert cfg.gcr_score == "dot" and cfg.amp is True and cfg.split_list is None and cfg.head_lr == 1e-3
    for text, value in (("on", True), ("true", True), ("1", True), ("off", False), ("False", False), ("no", False)):
        assert config_from_args(["--set", f"compile={text}"]).compile is value


def test_set_is_applied_last_and_the_last_repeat_wins():
    cfg = config_from_args(["--iters", "7", "--set", "iters=5", "--set", "w_ure=0.3", "--set", "w_ure=0.4"])
    assert cfg.iters == 5 and cfg.w_ure == 0.4
    assert config_from_args(["--no-gcr"]).gcr is False and config_from_args([]).gcr is True
    # over the VOC recipe: the recipe's values stay unless set
    cfg = config_from_args(["--data", "voc", "--data-root", str(REPO), "--pretrained", "none", "--set", "w_cre=0.5"])
    assert cfg.w_cre == 0.5 and cfg.w_ure == 0.1 and cfg.crop_size == 448


@pytest.mark.parametrize("item, expected", [
    ("nonexistent=1", "--set nonexistent: unknown TrainConfig field; closest: on_nonfinite"),
    ("w_cr=1", "closest: w_cre, w_ure, w_reg"),
    ("gcr=maybe", "--set gcr=maybe: expected on or off"),
    ("iters=2.5", "--set iters=2.5: expected an integer"),
    ("iters=0", "--set iters=0: expected a positive integer"),
    ("w_cre=-1", "--set w_cre=-1: expected a number >= 0"),
    ("eval_bkg=2", "--set eval_bkg=2: expected a number in [0, 1]"),
    ("kernels=cuda", "--set kernels=cuda: expected one of auto, triton, reference"),
    ("cam_scales=1,x", "--set cam_scales=1,x: expected comma-separated numbers"),
    ("cam_scales=1,-1", "--set cam_scales=1,-1: expected comma-separated numbers > 0"),
    ("data=voc", "--set data: use --data"),
    ("iters", "--set iters: expected FIELD=VALUE"),
])
def test_set_errors_are_one_line_and_exit_2(item, expected, capsys):
    with pytest.raises(SystemExit) as err:
        config_from_args(["--set", item])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_set_values_go_through_the_named_flags_checks(tmp_path, capsys):
    for item, flag in (("num_classes=9", "--num-classes"), ("resume=" + str(tmp_path / "missing"), "--resume"),
                       ("device=tpu", "--device")):
        with pytest.raises(SystemExit) as err:
            config_from_args(["--set", item])
        assert err.value.code == 2 and flag in capsys.readouterr().err


def test_unknown_field_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--set", "nonexistent=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "train.py: error: --set nonexistent: unknown TrainConfig field; closest: on_nonfinite, num_registers"]


def test_differs_from_recipe_lists_exactly_the_changed_fields():
    cfg = config_from_args(["--set", "gcr=off", "--set", "w_cre=0", "--out", "x", "--set", "cam_scales=1.0,0.5"])
    assert differs_from_recipe(cfg) == {"gcr": False, "w_cre": 0.0, "out": "x"}  # cam_scales is the recipe's
    voc = config_from_args(["--data", "voc", "--data-root", str(REPO), "--out", "x", "--pretrained", "none"])
    assert differs_from_recipe(voc) == {"data_root": str(REPO), "out": "x", "pretrained": None}


# ------------------------------------------------------------------------------- the switches
def test_gcr_switch_changes_the_forward():
    torch.manual_seed(3)
    on = MoReNet("vit_tiny_patch16_224", num_classes=3, depth=2, decoder_dim=16, patch_size=8).eval()
    torch.manual_seed(3)
    off = MoReNet("vit_tiny_patch16_224", num_classes=3, depth=2, decoder_dim=16, patch_size=8, gcr=False).eval()
    assert not any(k.startswith("graph_layer.") for k in off.state_dict())
    assert not list(off.graph_layer.parameters()) and off.param_groups()["gcr"] == []
    # same seed: every other weight is drawn alike, so the switch is the only difference
    on_state = {k: v for k, v in on.state_dict().items() if not k.startswith("graph_layer.")}
    assert on_state.keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in on_state.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = on(x), off(x)
        feats = off.forward_features(x)
    torch.testing.assert_close(b.class_tokens, feats.class_tokens, rtol=0, atol=0)  # Q = T without GCR
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.seg, b.seg, rtol=0, atol=0)
    assert (a.class_tokens - b.class_tokens).abs().max() > 1e-2
    expected = on.graph_layer(feats.class_tokens, feats.patch_tokens)
    torch.testing.assert_close(a.class_tokens, expected)


def test_lir_switch_drops_the_terms():
    on, off = TrainConfig(), TrainConfig(w_cre=0.0, w_ure=0.0)
    assert {"cre", "ure"} <= set(loss_weights(on, 0)) and not {"cre", "ure"} & set(loss_weights(off, 0))
    only_ure = loss_weights(TrainConfig(w_cre=0.0), 0)
    assert "cre" not in only_ure and only_ure["ure"] == 0.1
    model = MoReNet("vit_tiny_patch16_224", num_classes=3, depth=2, decoder_dim=16, patch_size=8)
    out = model(torch.randn(2, 3, 32, 32))
    labels = torch.randint(0, 4, (2, 16))
    cls = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    args = (out, cls, labels, labels, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool),
            None, torch.zeros(2, 3, 32, 32))
    total_off, terms_off = compute_losses(*args, loss_weights(off, 0), 0.5, 0.5, 15.0, 100.0)
    total_on, terms_on = compute_losses(*args, loss_weights(on, 0), 0.5, 0.5, 15.0, 100.0)
    assert set(terms_off) == {"cls", "aux", "mct", "ptc"} and {"cre", "ure"} <= set(terms_on)
    torch.testing.assert_close(total_on - total_off, 0.2 * terms_on["cre"] + 0.1 * terms_on["ure"])


# ------------------------------------------------------------------------------- ablate.py
TINY = ["--set", "synthetic_train=8", "--set", "synthetic_val=4", "--num-classes", "3", "--crop-size", "32",
        "--batch-size", "2", "--depth", "2", "--set", "decoder_dim=16", "--iters", "2", "--log-every", "1",
        "--workers", "0", "--kernels", "reference", "--set", "num_panels=1", "--cam-scales", "1.0"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("ablate")
    argv = ["--out", str(base / "grid"), "--data-root", str(base / "syn")] + TINY
    return base, argv, load_script("ablate").main(argv)


def test_ablate_writes_a_four_row_table_and_a_png(grid, capsys):
    base, argv, rc = grid
    assert rc == 0
    out = base / "grid"
    table = (out / "ablation.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| variant")
            and not line.startswith("| ---")]
    assert [r.split(" | ")[0] for r in rows] == ["| baseline", "| + GCR", "| + LIR", "| + GCR + LIR"]
    assert [r.split(" | ")[1:3] for r in rows] == [["off", "off"], ["on", "off"], ["off", "on"], ["on", "on"]]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "ablation.json").read_text())["variants"]
    for row, line in zip(data, rows):
        config = json.loads((out / row["variant"] / "config.json").read_text())
        assert config["gcr"] == row["gcr"] and (config["w_cre"] > 0) == row["lir"] and (config["w_ure"] > 0) == row["lir"]
        assert config["iters"] == 2 and config["seed"] == 0
        steps = [json.loads(line) for line in open(out / row["variant"] / "metrics.jsonl")]
        assert all(("cre" in r) == row["lir"] for r in steps if "loss" in r)
        assert set(row["miou"]) >= {"cam", "aux_cam", "lam", "decoder"}
        cells = [cell.split(" (")[0] for cell in line.split(" | ")[3:7]]
        assert cells == [f"{row['miou'][k]:.2f}" for k in ("cam", "aux_cam", "lam", "decoder")]
    from more_fast.checkpoint import load_checkpoint
    from more_fast.model.gcr import GCR, NoGCR

    baseline, _ = load_checkpoint(out / "baseline" / "checkpoints" / "ckpt_00000002.pt", map_location="cpu")
    with_gcr, _ = load_checkpoint(out / "gcr" / "checkpoints" / "ckpt_00000002.pt", map_location="cpu")
    assert isinstance(baseline.graph_layer, NoGCR) and isinstance(with_gcr.graph_layer, GCR)


def test_ablate_does_not_rerun_a_finished_variant(grid, capsys):
    base, argv, _ = grid
    ckpt = base / "grid" / "gcr" / "checkpoints" / "ckpt_00000002.pt"
    stamp = ckpt.stat().st_mtime_ns
    before = (base / "grid" / "ablation.json").read_text()
    assert load_script("ablate").main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 4 and " it " not in printed
    assert ckpt.stat().st_mtime_ns == stamp
    after = json.loads((base / "grid" / "ablation.json").read_text())["variants"]
    assert [r["miou"] for r in after] == [r["miou"] for r in json.loads(before)["variants"]]


def test_ablate_resumes_an_unfinished_variant_and_refuses_other_settings(grid, capsys):
    base, argv, _ = grid
    ablate = load_script("ablate")
    folder = base / "grid" / "lir"
    longer = config_from_args(ablate.variant_argv(argv[2:] + ["--iters", "3"], folder, False, True, False))
    assert ablate.folder_state(folder, longer) == ("resume", 2)
    assert ablate.variant_argv([], folder, False, True, True)[-2:] == ["--resume", str(folder)]
    other = config_from_args(ablate.variant_argv(argv[2:] + ["--seed", "1"], folder, False, True, False))
    with pytest.raises(SystemExit) as err:
        ablate.folder_state(folder, other)
    assert err.value.code == 2 and "other settings (seed)" in capsys.readouterr().err
    assert ablate.main(["--out", str(base / "x"), "--no-gcr"]) == 2


# ------------------------------------------------------------------------------- plot_metrics.py
def test_plot_metrics_draws_a_small_file(tmp_path, capsys, monkeypatch):
    records = [{"iter": i, "loss": 3.0 / i, "cls": 0.5, "aux": 0.4, "mct": 1.0, "ptc": 0.3, "cre": 5.0, "ure": 0.5,
                "lr": 1e-4, "img_per_s": 10.0} for i in (1, 2, 3, 4)]
    records += [{"iter": 2, "eval": {"cam": 10.0, "aux_cam": 11.0, "lam": 12.0, "decoder": 5.0, "background": 3.0}},
                {"iter": 4, "eval": {"cam": 20.0, "aux_cam": 21.0, "lam": 22.0, "decoder": 15.0, "background": 3.0},
                 "artifact": {"attention": 0.6, "lam": 0.4}},
                {"iter": 4, "loss": 0.5, "cls": 0.1}]  # a resumed run repeats iteration 4: the last one counts
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    plot_metrics = load_script("plot_metrics")
    steps, evals = plot_metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert list(steps) == [1, 2, 3, 4] and steps[4]["loss"] == 0.5 and list(evals) == [2, 4]
    assert plot_metrics.main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 logged iterations, 2 evaluations" in capsys.readouterr().out
    assert plot_metrics.main([str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert plot_metrics.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0]
