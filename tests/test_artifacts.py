"""The artifact ratio (more_fast/artifacts.py) on hand-made maps and masks, and in a tiny training run."""
import json
import os

import pytest
import torch

from more_fast.artifacts import ArtifactMeter, artifact_ratio, format_artifacts, patch_labels, present_classes
from more_fast.training import TrainConfig, Trainer

K = 3


def mask_from_patches(labels, patch=2):
    """A B x (h*patch) x (w*patch) mask whose every patch is filled with the given h x w labels."""
    labels = torch.as_tensor(labels)
    return labels.repeat_interleave(patch, -2).repeat_interleave(patch, -1)


def test_patch_labels_by_majority_with_ignore():
    mask = torch.tensor([[[1, 1, 0, 0, 255, 255],
                          [1, 2, 0, 255, 255, 3],
                          [2, 2, 3, 3, 255, 1],
                          [2, 0, 3, 255, 1, 255]]])  # 2 x 3 patches of 2 x 2 pixels
    labels = patch_labels(mask, (2, 3), K)
    # [1 1 1 2] -> 1; [0 0 0 255] -> 0; [255 255 255 3] -> 255; [2 2 2 0] -> 2;
    # [3 3 3 255] -> 3; [255 1 1 255] -> a tie of 1 and 255: the class wins
    assert labels.tolist() == [[1, 0, 255, 2, 3, 1]]
    # a tie between two labels goes to the smaller one
    assert patch_labels(torch.tensor([[[2, 3], [3, 2]]]), (1, 1), K).tolist() == [[2]]
    with pytest.raises(ValueError, match="mask: expected labels 0..3 or 255, got 7"):
        patch_labels(torch.full((1, 2, 2), 7), (1, 1), K)


def test_patch_labels_against_a_loop_on_random_masks():
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, K + 1, (2, 12, 8), generator=g)
    mask[torch.rand(mask.shape, generator=g) < 0.3] = 255
    labels = patch_labels(mask, (3, 2), K)
    for b in range(2):
        for i in range(3):
            for j in range(2):
                block = mask[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].flatten().tolist()
                values = list(range(K + 1)) + [255]
                counts = [block.count(v) for v in values]
                assert labels[b, i * 2 + j] == values[counts.index(max(counts))]


def test_ratio_is_0_inside_and_1_outside():
    labels = torch.tensor([[1, 1, 2, 0, 0, 255]])  # class 0 on patches 0, 1; class 1 on patch 2
    present = torch.tensor([[True, True, False]])
    inside = torch.tensor([[[0.3, 0.2, 0, 0, 0, 0.5], [0, 0, 0.7, 0, 0, 0], [0.1] * 6]])
    ratio, defined = artifact_ratio(inside, labels, present)
    assert defined.tolist() == [[True, True, False]]  # class 2 is not in the mask
    assert ratio[0, 0] == 0 and ratio[0, 1] == 0  # mass on 255 patches does not count
    outside = torch.tensor([[[0, 0, 0.4, 0.1, 0.2, 0.9], [0.25, 0, 0, 0.5, 0, 0], [0] * 6]])
    ratio, defined = artifact_ratio(outside, labels, present)
    assert ratio[0, 0] == 1 and ratio[0, 1] == 1


def test_ratio_mixed_case_by_hand_and_undefined_pairs():
    labels = torch.tensor([[1, 1, 2, 0, 255, 0], [3, 3, 3, 0, 0, 255]])
    present = torch.tensor([[True, True, False], [False, False, True]])
    maps = torch.tensor([
        [[0.1, 0.3, 0.2, 0.15, 0.9, 0.05], [0.0, 0.0, 0.0, 0.0, 0.4, 0.0], [0.2] * 6],
        [[0.5] * 6, [0.5] * 6, [0.1, 0.2, 0.3, 0.4, 0.0, 0.6]],
    ])
    ratio, defined = artifact_ratio(maps, labels, present)
    # image 0, class 0: own patches 0, 1 carry 0.4; others 2, 3, 5 carry 0.4; patch 4 (255) is left out
    assert ratio[0, 0].item() == pytest.approx(0.4 / 0.8)
    # image 0, class 1: all its mass is on a 255 patch: no denominator, left out
    assert defined.tolist() == [[True, False, False], [False, False, True]]
    # image 1, class 2: own patches 0-2 carry 0.6, background 3-4 carry 0.4, the 255 patch 5 is out
    assert ratio[1, 2].item() == pytest.approx(0.4 / 1.0)
    meter = ArtifactMeter(K)
    masks = mask_from_patches(labels.reshape(2, 2, 3))
    meter.update(masks, (2, 3), maps, maps - 0.05)  # the LAM's negative part is dropped
    result = meter.result()
    assert result["attention"] == pytest.approx((0.5 + 0.4) / 2) and result["pairs"] == 2
    assert result["attention_per_class"] == [pytest.approx(0.5), None, pytest.approx(0.4)]
    lam0 = (0.15 + 0.1 + 0.0) / (0.05 + 0.25 + 0.15 + 0.1 + 0.0)  # relu(maps - 0.05), image 0, class 0
    lam2 = (0.35 + 0.0) / (0.05 + 0.15 + 0.25 + 0.35 + 0.0)
    assert result["lam"] == pytest.approx((lam0 + lam2) / 2)
    # chance, over every present class with labelled patches: image 0, class 0 owns 2 of the 5
    # labelled patches, class 1 one; image 1, class 2 owns 3 of 5
    assert result["uniform"] == pytest.approx((3 / 5 + 4 / 5 + 2 / 5) / 3)
    text = format_artifacts(result)
    assert "class-patch attention" in text and "0.450" in text and "per class: 0.50 - 0.40" in text


def test_present_classes_and_a_mask_off_the_grid():
    mask = torch.tensor([[[0, 2, 255], [0, 0, 255], [3, 3, 3]]])
    assert present_classes(mask, K).tolist() == [[False, True, True]]
    # 3 x 3 pixels on a 2 x 2 grid: resized (nearest) to 2 x 2 before the vote
    assert patch_labels(mask, (2, 2), K).shape == (1, 4)
    with pytest.raises(ValueError, match="maps B x K x N"):
        artifact_ratio(torch.zeros(1, 3, 4), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("artifact_run")
    cfg = TrainConfig(data="synthetic", data_root=str(tmp_path / "syn"), synthetic_train=8, synthetic_val=4,
                      num_classes=3, crop_size=32, batch_size=2, depth=2, decoder_dim=16, iters=2, log_every=1,
                      eval_every=1, workers=0, out=str(tmp_path / "out"), cam_scales=(1.0,), num_panels=1,
                      kernels="reference")
    lines = []
    Trainer(cfg, log=lines.append).run()
    return cfg, lines


def test_a_tiny_run_logs_the_artifact_ratio(tiny_run):
    cfg, lines = tiny_run
    records = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    evals = [r for r in records if "eval" in r]
    assert [r["iter"] for r in evals] == [1, 2]
    for r in evals:
        art = r["artifact"]
        assert 0 <= art["attention"] <= 1 and 0 <= art["lam"] <= 1 and 0 < art["uniform"] < 1 and art["pairs"] > 0
        assert len(art["attention_per_class"]) == 3
    assert sum("artifact ratio (share" in line for line in lines) == 2
    assert any(line.startswith("artifact ratio at the end: class-patch attention") for line in lines)
    results = json.load(open(os.path.join(cfg.out, "results.json")))
    assert results["artifact"] == evals[-1]["artifact"]
    # the panel has 7 columns: image | CAM | LAM | attention | CAM label | decoder | ground truth
    from PIL import Image

    panel_dir = os.path.join(cfg.out, "panels", "iter_00000002")
    (panel,) = os.listdir(panel_dir)
    assert Image.open(os.path.join(panel_dir, panel)).size == (7 * 32, 32)


def test_the_meter_matches_a_direct_computation_on_a_model():
    """The evaluation's attention is the fused extraction's: the ratio on the model's own maps."""
    from more_fast.artifacts import measure_artifacts
    from more_fast.cam import lam_from_tokens
    from more_fast.model import MoReNet

    model = MoReNet("vit_tiny_patch16_224", num_classes=K, depth=2, decoder_dim=16, patch_size=8).eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, K + 1, (2, 32, 32), generator=g)
    result = measure_artifacts(model, [{"image": images, "mask": masks}], K, torch.device("cpu"))
    from more_fast.data import normalize

    with torch.no_grad():
        out = model(normalize(images), attn_reduce="mean_softmax")
        lam = lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid).flatten(2).clamp_min(0)
    labels, present = patch_labels(masks, out.grid, K), present_classes(masks, K)
    for name, maps in (("attention", out.class_patch_attn), ("lam", lam)):
        ratio, defined = artifact_ratio(maps, labels, present)
        assert result[name] == pytest.approx(float(ratio[defined].mean()))


def test_evaluate_script_reports_the_artifact_ratio(tiny_run, tmp_path, monkeypatch, capsys):
    import importlib.util
    import pathlib

    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")
    cfg, _ = tiny_run
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("script_evaluate", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = json.load(open(os.path.join(cfg.out, "results.json")))["artifact"]
    base = ["--checkpoint", os.path.join(cfg.out, "checkpoints", "ckpt_00000002.pt"), "--data", "synthetic",
            "--data-root", cfg.data_root, "--workers", "0", "--batch-size", "2"]
    for protocol in ("train-val", "published"):
        out = tmp_path / f"{protocol}.json"
        assert script.main(base + ["--protocol", protocol, "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        # the same weights and images as the run's last validation: the same ratios
        assert report["artifact"]["attention"] == pytest.approx(trained["attention"], abs=1e-6), protocol
        assert report["artifact"]["lam"] == pytest.approx(trained["lam"], abs=1e-6), protocol
    assert capsys.readouterr().out.count("artifact ratio (share") == 2
