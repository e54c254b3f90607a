"""End to end on a VOC-layout data set written here: train (--pretrained), load_model, evaluate.py, infer.py."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import more_fast
from more_fast.cli import config_from_args
from more_fast.crf import crf_available
from more_fast.data import save_label_png
from more_fast.training import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "vit_tiny_patch16_224"
SIZES = [(80, 64), (64, 96), (96, 80), (72, 72), (64, 64), (88, 72)]  # (H, W), any size: the loader resizes


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_voc(root: pathlib.Path, num_train: int = 6, num_val: int = 4, seed: int = 0) -> pathlib.Path:
    """VOC 2012 + SBD layout: JPEGImages, SegmentationClassAug (palette PNGs), train_aug/val lists."""
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    splits = {"train_aug": [], "val": []}
    for i in range(num_train + num_val):
        split = "train_aug" if i < num_train else "val"
        name = f"2007_{i:06d}"
        h, w = SIZES[i % len(SIZES)]
        image = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for cls in rng.choice(20, size=2, replace=False):
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y:y + h // 2, x:x + w // 2] = cls + 1
            image[y:y + h // 2, x:x + w // 2] = rng.integers(0, 255, 3)
        mask[0, :] = 255  # an ignore band, as VOC's object borders
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        save_label_png(root / "SegmentationClassAug" / f"{name}.png", mask)
        splits[split].append(name)
    for split, names in splits.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two iterations of the VOC recipe on the tiny set, from a timm checkpoint (--pretrained)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MORE_FAST_KERNELS", "reference")
    base = tmp_path_factory.mktemp("voc_run")
    root = write_voc(base / "VOC2012")
    pretrained = base / "vit_tiny.pth"
    torch.manual_seed(3)
    timm_state = timm.create_model(TINY, pretrained=False).state_dict()
    torch.save(timm_state, pretrained)
    cfg = config_from_args(["--data", "voc", "--data-root", str(root), "--backbone", TINY, "--pretrained",
                            str(pretrained), "--crop-size", "64", "--iters", "2", "--batch-size", "2",
                            "--workers", "0", "--kernels", "reference", "--out", str(base / "run")])
    logs = []
    trainer = Trainer(cfg, log=logs.append)
    results = trainer.run()
    yield {"root": root, "base": base, "trainer": trainer, "results": results, "logs": logs,
           "timm_state": timm_state, "checkpoint": base / "run" / "checkpoints" / "ckpt_00000002.pt"}
    mp.undo()


def test_training_runs_on_a_voc_layout_set(trained):
    t = trained
    assert t["trainer"].cfg.num_classes == 20 and len(t["trainer"].train_set) == 6
    assert any("initialized the backbone from" in line for line in t["logs"])
    assert set(t["results"]) >= {"cam", "aux_cam", "lam", "decoder", "background"}
    assert all(0.0 <= v <= 100.0 for v in t["results"].values())
    assert t["checkpoint"].is_file()
    saved = json.loads((t["base"] / "run" / "results.json").read_text())
    assert saved["iter"] == 2


def test_load_model_from_a_training_checkpoint(trained):
    model = more_fast.load_model(trained["checkpoint"])
    assert not model.training and model.config["backbone"] == TINY and model.num_classes == 20
    net = trained["trainer"].model.eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        want, got = net(x), model(x)
    for name in ("logits", "aux_logits", "seg", "class_tokens", "patch_tokens"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)


def test_evaluate_script_both_protocols(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")
    script = load_script("evaluate")
    crf = crf_available()  # pydensecrf2 is optional: the CRF rows are checked where it is installed
    argv = ["--checkpoint", str(trained["checkpoint"]), "--data", "voc", "--data-root", str(trained["root"]),
            "--split", "val", "--protocol", "both", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
            "--save-png", str(tmp_path / "png"), "--json", str(tmp_path / "r.json")] + (["--crf"] if crf else [])
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    maps = {"cam", "aux_cam", "lam", "decoder", "background"}
    assert maps <= set(report["train-val"]) and maps <= set(report["published"])
    assert report["published"]["images"] == 4 and report["published"]["has_ground_truth"]
    if crf:
        assert {"lam_crf", "decoder_crf"} <= set(report["published"])
    # train-val reproduces the training loop's own validation of the same checkpoint
    for name in ("cam", "aux_cam", "lam", "decoder"):
        assert report["train-val"][name] == pytest.approx(trained["results"][name], abs=1e-6)
    # VOC palette PNGs at each image's original size
    val = (trained["root"] / "ImageSets/Segmentation/val.txt").read_text().split()
    for name in val:
        png = Image.open(tmp_path / "png" / f"{name}.png")
        assert png.mode == "P"
        assert png.size == Image.open(trained["root"] / "JPEGImages" / f"{name}.jpg").size
        assert np.asarray(png).max() <= 20


def test_evaluate_script_errors(trained, tmp_path, capsys):
    script = load_script("evaluate")
    assert script.main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_infer_script_writes_panels(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("2007_000006", "2007_000007"):
        (images / f"{name}.jpg").write_bytes((trained["root"] / "JPEGImages" / f"{name}.jpg").read_bytes())
    out = tmp_path / "out"
    argv = ["--checkpoint", str(trained["checkpoint"]), "--images", str(images), "--out", str(out),
            "--crop-size", "48", "--scales", "1.0,0.5"]
    assert load_script("infer").main(argv) == 0
    for name in ("2007_000006", "2007_000007"):
        assert Image.open(out / f"{name}.png").size == (5 * 48, 48)  # image | CAM | LAM | attention | prediction
    labels = json.loads((out / "predictions.json").read_text())
    assert set(labels) == {"2007_000006", "2007_000007"}
    assert all(len(v) >= 1 and all(0 < p <= 1 for p in v.values()) for v in labels.values())


def test_crop_check_uses_the_checkpoints_patch_size(tmp_path, monkeypatch, capsys):
    """evaluate.py and infer.py check --crop-size against the loaded backbone's patch (8 here), not 16."""
    from more_fast.model.network import MoReNet

    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")
    torch.manual_seed(0)
    net = MoReNet(TINY, num_classes=3, depth=1, decoder_dim=16, patch_size=8)
    ckpt = tmp_path / "p8.pt"
    torch.save({"model": net.state_dict(), "model_config": net.config}, ckpt)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / "a.png")
    infer = load_script("infer")
    argv = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--scales", "1.0"]
    assert infer.main(argv + ["--crop-size", "20"]) == 2
    assert "--crop-size: expected a multiple of the patch size 8 of vit_tiny_patch16_224, got 20" in capsys.readouterr().err
    assert infer.main(argv + ["--crop-size", "24"]) == 0  # not a multiple of 16: accepted for patch 8
    assert Image.open(tmp_path / "out" / "a.png").size == (5 * 24, 24)
    evaluate = load_script("evaluate")
    assert evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu", "--crop-size", "20"]) == 2
    assert "--crop-size: expected a multiple of the patch size 8 of vit_tiny_patch16_224, got 20" in capsys.readouterr().err
