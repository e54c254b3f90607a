"""Data layer: the synthetic set, the VOC / COCO loaders, label caching, transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from more_fast.data import (COCO_CLASSES, IMAGENET_MEAN, IMAGENET_STD, SYNTHETIC_CLASSES,
                            VOC_CLASSES, SegmentationDataset, coco_dataset, denormalize,
                            make_synthetic_voc, normalize, read_split, save_label_png,
                            voc_dataset, voc_palette)

# --- helpers -------------------------------------------------------------------------------


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _mask_classes(mask: np.ndarray) -> set[int]:
    return {int(v) - 1 for v in np.unique(mask) if v not in (0, 255)}


def _write_sample(root: Path, image_dir: str, mask_dir: str | None, name: str,
                  mask: np.ndarray, rng: np.random.Generator) -> None:
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / image_dir / f"{name}.jpg", quality=95)
    if mask_dir is not None:
        (root / mask_dir).mkdir(parents=True, exist_ok=True)
        save_label_png(root / mask_dir / f"{name}.png", mask)


def _write_split(root: Path, split: str, names: list[str]) -> None:
    folder = root / "ImageSets" / "Segmentation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.txt").write_text("\n".join(names) + "\n")


def _masks(num_classes: int) -> dict[str, np.ndarray]:
    """Three 40 x 56 masks with known classes, an ignore band, and one background-only mask."""
    masks = {}
    a = np.zeros((40, 56), np.uint8)
    a[5:20, 5:30] = 1
    a[25:38, 30:50] = num_classes
    a[4, 5:30] = 255
    masks["img_a"] = a
    b = np.zeros((40, 56), np.uint8)
    b[10:30, 10:40] = 7
    masks["img_b"] = b
    masks["img_c"] = np.zeros((40, 56), np.uint8)
    return masks


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_voc(tmp_path_factory.mktemp("synthetic"), num_train=40, num_val=60)


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    masks = _masks(len(VOC_CLASSES))
    for name, mask in masks.items():
        _write_sample(tmp_path, "JPEGImages", "SegmentationClassAug", name, mask, rng)
    _write_split(tmp_path, "train", list(masks))
    _write_split(tmp_path, "val", ["img_b", "img_c"])
    return tmp_path


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed(tmp_path: Path) -> None:
    kwargs = dict(num_train=4, num_val=3, image_size=48)
    first = _tree_bytes(make_synthetic_voc(tmp_path / "a", seed=0, **kwargs))
    again = _tree_bytes(make_synthetic_voc(tmp_path / "b", seed=0, **kwargs))
    other = _tree_bytes(make_synthetic_voc(tmp_path / "c", seed=1, **kwargs))
    assert first == again
    images = [key for key in first if key.startswith("JPEGImages")]
    assert len(images) == 7
    assert all(first[key] != other[key] for key in images)


def test_synthetic_layout_classes_and_labels_agree(synthetic_root: Path) -> None:
    meta = json.loads((synthetic_root / "synthetic.json").read_text())
    assert meta["complete"] and meta["classes"] == list(SYNTHETIC_CLASSES)
    for split, count in (("train", 40), ("val", 60)):
        data = SegmentationDataset(synthetic_root, split, len(SYNTHETIC_CLASSES), False, 96)
        assert len(data) == count
        for index, name in enumerate(data.names):
            mask = np.array(Image.open(synthetic_root / "SegmentationClassAug" / f"{name}.png"))
            image = Image.open(synthetic_root / "JPEGImages" / f"{name}.jpg")
            assert image.size == (96, 96) and mask.shape == (96, 96)
            assert set(np.unique(mask)) <= set(range(len(SYNTHETIC_CLASSES) + 1)) | {255}
            classes = _mask_classes(mask)
            assert 1 <= len(classes) <= 3
            assert set(np.flatnonzero(data.cls_labels[index])) == classes


def test_synthetic_second_call_is_a_noop_and_params_regenerate(tmp_path: Path) -> None:
    root = make_synthetic_voc(tmp_path, num_train=3, num_val=2, image_size=48)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert make_synthetic_voc(tmp_path, num_train=3, num_val=2, image_size=48) == root
    assert stamps == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    make_synthetic_voc(tmp_path, num_train=3, num_val=5, image_size=48)
    assert len(read_split(root, "val")) == 5
    # An interrupted generation (complete: false) is regenerated, not trusted.
    meta = root / "synthetic.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "complete": False}))
    (root / "JPEGImages" / "val_00004.jpg").unlink()
    make_synthetic_voc(tmp_path, num_train=3, num_val=5, image_size=48)
    assert (root / "JPEGImages" / "val_00004.jpg").is_file()
    assert json.loads(meta.read_text())["complete"]


def test_synthetic_refuses_to_overwrite_foreign_data(voc_root: Path) -> None:
    with pytest.raises(FileExistsError, match="synthetic.json"):
        make_synthetic_voc(voc_root, num_train=2, num_val=2)


def test_all_background_baseline_is_far_from_solving_the_set(synthetic_root: Path) -> None:
    num = len(SYNTHETIC_CLASSES) + 1
    confusion = np.zeros((num, num), np.int64)
    for name in read_split(synthetic_root, "val"):
        gt = np.array(Image.open(synthetic_root / "SegmentationClassAug" / f"{name}.png"))
        gt = gt[gt != 255].astype(np.int64)
        confusion += np.bincount(gt * num, minlength=num * num).reshape(num, num)  # pred = 0
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert iou.mean() < 0.25
    assert 0.5 < iou[0] < 0.95  # objects cover a sizeable share of the pixels


# --- VOC / COCO loaders --------------------------------------------------------------------


def _check_sample(sample: dict, crop: int, num_classes: int) -> None:
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, crop, crop)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (crop, crop)
    assert sample["cls_label"].dtype == torch.float32
    assert sample["cls_label"].shape == (num_classes,)
    assert type(sample["image"]) is torch.Tensor and type(sample["mask"]) is torch.Tensor


@pytest.mark.parametrize("train", [True, False])
def test_voc_dataset_labels_shapes_dtypes(voc_root: Path, train: bool) -> None:
    data = voc_dataset(voc_root, "train", train=train, crop_size=32)
    assert data.names == ["img_a", "img_b", "img_c"] and len(data) == 3
    expected = {"img_a": {0, 19}, "img_b": {6}, "img_c": set()}
    for index, name in enumerate(data.names):
        sample = data[index]
        _check_sample(sample, 32, 20)
        assert sample["name"] == name and sample["index"] == index
        assert set(torch.nonzero(sample["cls_label"]).flatten().tolist()) == expected[name]
        values = set(torch.unique(sample["mask"]).tolist())
        assert values <= {0, 255} | {c + 1 for c in expected[name]}
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["cls_label"].shape == (3, 20)


def test_eval_resize_is_nearest_for_the_mask(voc_root: Path) -> None:
    sample = voc_dataset(voc_root, "train", train=False, crop_size=16)[0]
    mask = np.array(Image.open(voc_root / "SegmentationClassAug" / "img_a.png"))
    rows = (np.arange(16) * 40 / 16).astype(int)
    cols = (np.arange(16) * 56 / 16).astype(int)
    assert np.array_equal(sample["mask"].numpy(), mask[rows][:, cols])


def test_voc_falls_back_to_segmentation_class(voc_root: Path) -> None:
    (voc_root / "SegmentationClassAug").rename(voc_root / "SegmentationClass")
    data = voc_dataset(voc_root, "val", train=False, crop_size=32)
    assert data.has_masks and data.cls_labels[0, 6] == 1


def test_test_split_labels_from_annotations(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("t1", "t2"):
        _write_sample(tmp_path, "JPEGImages", None, name, np.zeros((24, 40), np.uint8), rng)
    _write_split(tmp_path, "test", ["t1", "t2"])
    data = voc_dataset(tmp_path, "test", train=False, crop_size=16)
    assert not data.has_masks and not data.cls_labels.any()
    assert (data[0]["mask"] == 255).all()
    (tmp_path / "Annotations").mkdir()
    for name, objects in (("t1", ["dog", "person", "dog"]), ("t2", ["tvmonitor"])):
        body = "".join(f"<object><name>{o}</name></object>" for o in objects)
        (tmp_path / "Annotations" / f"{name}.xml").write_text(f"<annotation>{body}</annotation>")
    data = voc_dataset(tmp_path, "test", train=False, crop_size=16)
    assert np.flatnonzero(data.cls_labels[0]).tolist() == [11, 14]
    assert np.flatnonzero(data.cls_labels[1]).tolist() == [19]


@pytest.mark.parametrize("split,folder", [("train", "train2014"), ("val", "val2014")])
def test_coco_layout(tmp_path: Path, split: str, folder: str) -> None:
    rng = np.random.default_rng(2)
    masks = _masks(len(COCO_CLASSES))
    for name, mask in masks.items():
        _write_sample(tmp_path, f"JPEGImages/{folder}", f"SegmentationClass/{folder}",
                      f"COCO_{folder}_{name}", mask, rng)
    _write_split(tmp_path, split, [f"COCO_{folder}_{name}" for name in masks])
    for train in (True, False):
        data = coco_dataset(tmp_path, split, train=train, crop_size=48)
        _check_sample(data[0], 48, 80)
        assert np.flatnonzero(data.cls_labels[0]).tolist() == [0, 79]
        assert np.flatnonzero(data.cls_labels[1]).tolist() == [6]
        assert data.class_names == COCO_CLASSES
    with pytest.raises(ValueError, match="split"):
        coco_dataset(tmp_path, "test", train=False, crop_size=48)


# --- errors --------------------------------------------------------------------------------


def test_missing_split_list_names_path_and_split(voc_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_aug") as info:
        voc_dataset(voc_root, "train_aug", train=True, crop_size=32)
    assert str(voc_root / "ImageSets" / "Segmentation" / "train_aug.txt") in str(info.value)


def test_missing_image_or_mask_names_file_and_split(voc_root: Path) -> None:
    (voc_root / "SegmentationClassAug" / "img_b.png").unlink()
    with pytest.raises(FileNotFoundError, match="'train'") as info:
        voc_dataset(voc_root, "train", train=True, crop_size=32)
    assert str(voc_root / "SegmentationClassAug" / "img_b.png") in str(info.value)
    (voc_root / "JPEGImages" / "img_c.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="'val'") as info:
        voc_dataset(voc_root, "val", train=False, crop_size=32)
    assert str(voc_root / "JPEGImages" / "img_c.jpg") in str(info.value)


@pytest.mark.parametrize("crop", [0, -16, 30, 24, 32.0])
def test_bad_crop_size(voc_root: Path, crop: object) -> None:
    with pytest.raises(ValueError, match="crop_size"):
        voc_dataset(voc_root, "train", train=True, crop_size=crop)


def test_mask_value_outside_the_classes_is_an_error(voc_root: Path) -> None:
    save_label_png(voc_root / "SegmentationClassAug" / "img_c.png", np.full((40, 56), 30))
    with pytest.raises(ValueError, match="img_c.png"):
        voc_dataset(voc_root, "train", train=False, crop_size=32)


def test_split_list_argument_and_path_pairs(voc_root: Path) -> None:
    listing = voc_root / "pairs.txt"
    listing.write_text("/JPEGImages/img_b.jpg /SegmentationClassAug/img_b.png\n\nimg_a\n")
    assert read_split(voc_root, "custom", listing) == ["img_b", "img_a"]


# --- label cache ---------------------------------------------------------------------------


def test_label_cache_is_written_once_and_reused(voc_root: Path) -> None:
    first = voc_dataset(voc_root, "train", train=False, crop_size=32)
    cache_files = list((voc_root / ".more_fast_cache").glob("*.npy"))
    assert len(cache_files) == 1
    # Reuse: a doctored cache file is served as is (the masks are not read again).
    doctored = first.cls_labels.copy()
    doctored[2, 3] = 1
    np.save(cache_files[0], doctored)
    stamp = cache_files[0].stat().st_mtime_ns
    second = voc_dataset(voc_root, "train", train=True, crop_size=32)
    assert np.array_equal(second.cls_labels, doctored)
    assert cache_files[0].stat().st_mtime_ns == stamp
    # An edited mask changes the digest: the labels are derived again.
    save_label_png(voc_root / "SegmentationClassAug" / "img_c.png", np.full((40, 56), 3))
    third = voc_dataset(voc_root, "train", train=False, crop_size=32)
    assert np.flatnonzero(third.cls_labels[2]).tolist() == [2]
    assert len(list((voc_root / ".more_fast_cache").glob("*.npy"))) == 2


def test_label_cache_dir_argument_and_fallback(voc_root: Path,
                                               tmp_path_factory: pytest.TempPathFactory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path_factory.mktemp("explicit")
    voc_dataset(voc_root, "train", train=False, crop_size=32, cache_dir=explicit)
    assert len(list(explicit.glob("*.npy"))) == 1
    assert not (voc_root / ".more_fast_cache").exists()
    # A root where the cache folder cannot be made falls back to the user cache dir.
    (voc_root / ".more_fast_cache").write_text("not a folder")
    user = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(user))
    data = voc_dataset(voc_root, "train", train=False, crop_size=32)
    assert len(list((user / "more_fast").glob("*/*.npy"))) == 1
    assert data.cls_labels[0, 19] == 1


# --- transforms ----------------------------------------------------------------------------


def test_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    """White pixels are class 1, black pixels background: every augmentation must agree."""
    mask = np.zeros((64, 80), np.uint8)
    mask[8:40, 6:30] = 1
    mask[30:60, 50:76] = 1
    mask[44:56, 10:20] = 1  # asymmetric, so a flip of one but not the other shows
    (tmp_path / "JPEGImages").mkdir()
    Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=2)).save(
        tmp_path / "JPEGImages" / "x.jpg", quality=100)
    (tmp_path / "SegmentationClassAug").mkdir()
    save_label_png(tmp_path / "SegmentationClassAug" / "x.png", mask)
    _write_split(tmp_path, "train", ["x"])
    data = SegmentationDataset(tmp_path, "train", 1, True, 32)
    torch.manual_seed(0)
    for _ in range(30):
        sample = data[0]
        gray = sample["image"].float().mean(0)
        target = sample["mask"]
        # Judge pixels whose 5 x 5 neighbourhood has one label (resampling blurs edges).
        pooled = torch.nn.functional.max_pool2d
        m = target.float()[None, None]
        inside = -pooled(-m, 5, 1, 2)[0, 0] == 1
        outside = pooled(m, 5, 1, 2)[0, 0] == 0
        if inside.any() and outside.any():
            assert gray[inside].min() > gray[outside].max()


def test_normalize_round_trip() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = normalize(images, device="cpu")
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    expected = (images[:, 1].float() / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert torch.allclose(out[:, 1], expected)
    assert torch.allclose(denormalize(out), images.float(), atol=1e-3)
    assert torch.allclose(normalize(images[0]), out[0])
    with pytest.raises(ValueError, match="3 x H x W"):
        normalize(torch.zeros(2, 4, 8, 8))


def test_palette_png_round_trip(tmp_path: Path) -> None:
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[1].tolist() == [128, 0, 0] and palette[255].tolist() == [224, 224, 192]
    label = np.random.default_rng(3).integers(0, 21, (9, 13))
    label[0, 0] = 255
    save_label_png(tmp_path / "l.png", label)
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode == "P"
        assert np.array_equal(np.array(image), label)
        assert np.array_equal(np.array(image.getpalette()[:768]).reshape(256, 3), palette)
