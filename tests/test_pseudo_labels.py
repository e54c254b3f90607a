"""scripts/pseudo_labels.py on a VOC-layout set written here, with a tiny untrained checkpoint; and
scripts/evaluate.py --crf in a process where pydensecrf cannot be imported."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from more_fast.data import voc_palette
from more_fast.data.labels import read_mask
from more_fast.model.network import MoReNet
from test_scripts import REPO, load_script, write_voc

TINY = "vit_tiny_patch16_224"
COMMON = ["--crop-size", "64", "--workers", "0", "--scales", "1.0,0.5", "--kernels", "reference"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("pseudo")
    root = write_voc(base / "VOC2012")
    torch.manual_seed(0)
    net = MoReNet(TINY, num_classes=20, depth=2, img_size=64, decoder_dim=32)
    ckpt = base / "tiny.pt"
    torch.save({"model": net.state_dict(), "model_config": net.config}, ckpt)
    return {"root": root, "ckpt": ckpt, "base": base}


def run(setup, out, *extra, capsys):
    script = load_script("pseudo_labels")
    code = script.main(["--checkpoint", str(setup["ckpt"]), "--data", "voc", "--data-root", str(setup["root"]),
                        "--split", "train_aug", "--out", str(out), *COMMON, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_writes_palette_pngs_resumes_and_scores(setup, tmp_path, capsys):
    out = tmp_path / "labels"
    code, text, _ = run(setup, out, "--crf", "--limit", "3", capsys=capsys)
    assert code == 0 and "3 to label" in text and "ETA" in text
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(first) == [f"2007_{i:06d}.png" for i in range(3)]
    code, text, _ = run(setup, out, "--crf", "--json", str(tmp_path / "s.json"), capsys=capsys)
    assert code == 0 and "3 already in" in text and "3 to label" in text
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"2007_{i:06d}.png" for i in range(6)]  # PNGs only: no score files, no temporaries
    assert all(files[i].stat().st_mtime_ns == first[files[i].name] for i in range(3))  # resumed, not redone
    for p in files:
        with Image.open(p) as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im.getpalette()[:768], dtype=np.uint8).reshape(256, 3), voc_palette())
        label = read_mask(p)
        mask = read_mask(setup["root"] / "SegmentationClassAug" / p.name)
        assert label.shape == mask.shape and label.max() <= 20
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] == 3 and summary["written"] == 3 and summary["scored"] == 6
    assert f"pseudo-label mIoU" in text and f"{summary['miou']:.2f}" in text
    # the same labels and mIoU as one uninterrupted run
    fresh = tmp_path / "fresh"
    code, text2, _ = run(setup, fresh, "--crf", "--json", str(tmp_path / "f.json"), capsys=capsys)
    assert code == 0
    for p in files:
        np.testing.assert_array_equal(read_mask(fresh / p.name), read_mask(p))
    assert json.loads((tmp_path / "f.json").read_text())["miou"] == summary["miou"]


def test_without_crf_is_the_map_protocol(setup, tmp_path, capsys):
    from more_fast import cam as C
    from more_fast.protocols import OriginalSize, network_input, published_maps
    from more_fast.training.data import build_dataset
    from more_fast.training.config import TrainConfig
    import torch.nn.functional as F

    out = tmp_path / "plain"
    code, text, _ = run(setup, out, "--limit", "2", "--bkg", "0.4", capsys=capsys)
    assert code == 0 and "background 0.4" in text
    model = MoReNet(TINY, num_classes=20, depth=2, img_size=64, decoder_dim=32)
    state = torch.load(setup["ckpt"], weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    ds = build_dataset(TrainConfig(data="voc", num_classes=20, crop_size=64), setup["root"], "train_aug", False)
    sample = OriginalSize(ds)[0]
    with torch.no_grad():
        maps = published_maps(model, network_input([sample["image"]], 64, torch.device("cpu")), (1.0, 0.5), (1.0,))
        lam = F.interpolate(maps["lam"], size=tuple(sample["image"].shape[1:]), mode="bilinear", align_corners=False)
        want = C.map_prediction(lam, sample["cls_label"][None].float(), 0.4)[0].numpy()
    np.testing.assert_array_equal(read_mask(out / f"{ds.names[0]}.png"), want)


def test_a_bad_image_is_reported_and_the_rest_written(setup, tmp_path, capsys):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(setup["root"], root)
    (root / "JPEGImages" / "2007_000001.jpg").write_bytes(b"not a jpeg")
    script = load_script("pseudo_labels")
    out = tmp_path / "labels"
    code = script.main(["--checkpoint", str(setup["ckpt"]), "--data", "voc", "--data-root", str(root),
                        "--split", "train_aug", "--out", str(out), *COMMON])
    captured = capsys.readouterr()
    assert code == 0
    lines = [line for line in captured.err.splitlines() if "2007_000001" in line]
    assert len(lines) == 1 and lines[0].startswith("skipped:")
    assert sorted(p.name for p in out.iterdir()) == [f"2007_{i:06d}.png" for i in range(6) if i != 1]
    assert "1 skipped" in captured.out and "mIoU" in captured.out


def test_bad_arguments(setup, tmp_path, capsys):
    code, _, err = run(setup, tmp_path / "o", "--bkg", "1.5", capsys=capsys)
    assert code == 2 and "--bkg" in err


def test_evaluate_crf_runs_without_pydensecrf(setup, tmp_path):
    """scripts/evaluate.py --crf in a process where `import pydensecrf` fails (a sitecustomize shim)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['pydensecrf'] = None\n"
                                           "sys.modules['pydensecrf.densecrf'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(REPO), os.environ.get("PYTHONPATH", "")]),
               MORE_FAST_KERNELS="reference")
    base = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--checkpoint", str(setup["ckpt"]), "--data", "voc",
            "--data-root", str(setup["root"]), "--split", "val", "--crop-size", "64", "--workers", "0", "--crf"]
    probe = subprocess.run([sys.executable, "-c", "import more_fast.crf as c; print(c.crf_available('pydensecrf'))"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr  # the shim works
    done = subprocess.run(base + ["--json", str(tmp_path / "r.json"), "--crf-workers", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: --crf-workers applies to --crf-backend pydensecrf" in done.stderr  # the lattice: no process pool
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"lam_crf", "decoder_crf"} <= set(report["published"])
    assert "LAM + CRF" in done.stdout
    refused = subprocess.run(base + ["--crf-backend", "pydensecrf", "--limit", "1"], env=env, capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode == 2 and "pip install pydensecrf2" in refused.stderr
