"""--tensorboard: the event files hold the metrics.jsonl scalars and the evaluation panels."""
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from more_fast.cli import config_from_args
from more_fast.training import TrainConfig, Trainer
from more_fast.training import tb

ROOT = pathlib.Path(__file__).resolve().parents[1]
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _tiny_cfg(tmp_path, **kw):
    base = dict(data="synthetic", data_root=str(tmp_path / "syn"), synthetic_train=8, synthetic_val=4,
                num_classes=3, crop_size=32, batch_size=2, backbone="vit_tiny_patch16_224", depth=3,
                decoder_dim=16, iters=3, log_every=1, eval_every=2, workers=0, out=str(tmp_path / "out"),
                cam_scales=(1.0,), num_panels=2, kernels="reference", tensorboard=True)
    base.update(kw)
    return TrainConfig(**base)


def _events(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_and_panels_match_the_run_outputs(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    Trainer(cfg, log=lambda m: None).run()
    out = pathlib.Path(cfg.out)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    acc = _events(out / "tensorboard")

    want: dict[str, dict[int, float]] = {}
    for record in records:
        for tag, value in tb.scalars_of(record).items():
            want.setdefault(tag, {})[record["iter"]] = value
    assert {"train/loss", "train/cls", "train/lr", "train/img_per_s", "eval/lam", "eval/decoder"} <= set(want)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(got) == set(by_step), tag
        for step, value in by_step.items():  # event files store float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    assert sorted(want["eval/lam"]) == [2, 3]  # evaluations at iteration 2 and at the end

    for step in (2, 3):
        pngs = sorted((out / "panels" / f"iter_{step:08d}").glob("*.png"))
        assert len(pngs) == 2
        for png in pngs:
            events = [e for e in acc.Images(f"panels/{png.stem}") if e.step == step]
            assert len(events) == 1
            decoded = np.asarray(Image.open(io.BytesIO(events[0].encoded_image_string)).convert("RGB"))
            assert np.array_equal(decoded, np.asarray(Image.open(png).convert("RGB"))), png


def test_scalars_of_flattens_the_evaluation_table_and_skips_flags():
    assert tb.scalars_of({"iter": 5, "loss": 1.5, "skipped": 0, "ok": True, "name": "x"}) == {
        "train/loss": 1.5, "train/skipped": 0.0}
    assert tb.scalars_of({"iter": 8, "eval": {"cam": 60.0, "lam": 70.5}}) == {"eval/cam": 60.0, "eval/lam": 70.5}


def test_without_the_flag_nothing_is_written(tmp_path):
    cfg = _tiny_cfg(tmp_path, tensorboard=False, iters=1, eval_every=1000, num_panels=0)
    Trainer(cfg, log=lambda m: None).run()
    assert not (pathlib.Path(cfg.out) / "tensorboard").exists()


def test_flag_reaches_the_config():
    assert config_from_args(["--tensorboard"]).tensorboard is True
    assert config_from_args([]).tensorboard is False


def test_missing_tensorboard_is_one_line_before_any_work(tmp_path):
    """With tensorboard not importable, train.py exits 2 with one line naming the flag and the extra."""
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "sys.argv = ['train.py', '--tensorboard', '--out', sys.argv[1], '--data-root', sys.argv[2]]\n"
        "import runpy; runpy.run_path(%r, run_name='__main__')\n"
        % str(ROOT / "scripts" / "train.py")
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "syn")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: --tensorboard: needs the tensorboard package, which is not installed "
                     "(pip install -e \".[tensorboard]\" or pip install tensorboard)"], proc.stderr
    assert not (tmp_path / "syn").exists()  # failed before generating data
