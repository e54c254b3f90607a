"""scripts/prepare_voc.py and scripts/prepare_coco.py on tiny archives in the real formats: SBD's
cls/*.mat (scipy.io.savemat, GTcls with Segmentation / Boundaries / CategoriesPresent), VOC's palette
PNGs, a COCO instances JSON with polygons, an uncompressed and a compressed RLE, and crowd regions.

Every output pixel is checked against masks the test computes itself: the VOC rule (VOC 2012's own
mask where both have one) and, for COCO, rectilinear polygons on integer corners (which cover the
pixels [y0, y1) x [x0, x1): pycocotools' pixel (r, c) is the unit square at corner (c, r)) and
run-length codes the test encodes itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from more_fast.data import COCO_CLASSES, save_label_png, voc_palette

scipy_io = pytest.importorskip("scipy.io")
mask_utils = pytest.importorskip("pycocotools.mask")
sparse = pytest.importorskip("scipy.sparse")

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_voc = load_script("prepare_voc")
prepare_coco = load_script("prepare_coco")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file (and link) under root: its bytes and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = (os.readlink(path).encode(), path.lstat().st_mtime_ns)
        elif path.is_file():
            out[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def _one_error(err: str) -> bool:
    """stderr ends with exactly one error line (progress lines may come before it), no traceback."""
    lines = err.splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and \
        sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err


def _read_png(path: Path) -> tuple[str, np.ndarray, bytes]:
    with Image.open(path) as image:
        return image.mode, np.array(image), bytes(image.getpalette() or [])


def _jpeg(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


# ------------------------------------------------------------------------------------------ VOC
def _blocks(h: int, w: int, classes, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for c in classes:
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y:y + h // 2, x:x + w // 2] = c
    return mask


def _save_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """A cls/*.mat as SBD ships it: a 1 x 1 struct GTcls with Segmentation (uint8 H x W),
    Boundaries (a 20 x 1 cell of sparse edge maps) and CategoriesPresent (the classes present)."""
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        edge = np.zeros(seg.shape, np.uint8)
        if (seg == c + 1).any():
            edge[seg == c + 1] = 1
        boundaries[c, 0] = sparse.csc_matrix(edge)
    present = np.array([c for c in np.unique(seg) if c], dtype=np.uint8).reshape(-1, 1)
    scipy_io.savemat(str(path), {"GTcls": {"Segmentation": seg, "Boundaries": boundaries,
                                           "CategoriesPresent": present}})


# name: (in VOC's SegmentationClass list, in SBD's, VOC list, SBD list)
VOC_NAMES = {
    "2007_000001": ("train", None),     # VOC train only
    "2007_000002": ("train", "train"),  # both: VOC's mask wins
    "2007_000003": ("val", "train"),    # VOC val, also SBD train: VOC's mask, not in train_aug
    "2007_000004": ("val", None),       # VOC val only
    "2008_000001": (None, "train"),     # SBD train only
    "2008_000002": (None, "val"),       # SBD val only
    "2008_000003": ("train", "val"),    # both: VOC's mask wins
    "2008_000004": (None, "train"),     # SBD train, a second time in SBD val (a name in two lists)
}
DETECTION_ONLY = ["2009_000001", "2009_000002"]  # images without any mask


def make_voc_sbd(base: Path, seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray], list[str]]:
    """VOC2012/ and benchmark_RELEASE/dataset/; the expected SegmentationClassAug masks and train_aug."""
    rng = np.random.default_rng(seed)
    voc, sbd = base / "VOC2012", base / "benchmark_RELEASE" / "dataset"
    (voc / "SegmentationClass").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (sbd / "cls").mkdir(parents=True)
    lists = {("voc", "train"): [], ("voc", "val"): [], ("sbd", "train"): [], ("sbd", "val"): []}
    expected = {}
    for i, (name, (in_voc, in_sbd)) in enumerate(VOC_NAMES.items()):
        h, w = 24 + 4 * (i % 3), 32 + 8 * (i % 2)
        _jpeg(voc / "JPEGImages" / f"{name}.jpg", h, w, rng)
        voc_mask = sbd_mask = None
        if in_sbd:
            sbd_mask = _blocks(h, w, rng.choice(np.arange(1, 21), 2, replace=False), rng)
            _save_sbd_mat(sbd / "cls" / f"{name}.mat", sbd_mask)
            lists[("sbd", in_sbd)].append(name)
        if in_voc:
            voc_mask = _blocks(h, w, rng.choice(np.arange(1, 21), 2, replace=False), rng)
            voc_mask[0, :] = 255  # VOC's object borders / void
            voc_mask[h // 2, w // 3: w // 2] = 255
            save_label_png(voc / "SegmentationClass" / f"{name}.png", voc_mask)
            lists[("voc", in_voc)].append(name)
        expected[name] = voc_mask if voc_mask is not None else sbd_mask  # the rule, independently
    lists[("sbd", "val")].append("2008_000004")
    for name in DETECTION_ONLY:
        _jpeg(voc / "JPEGImages" / f"{name}.jpg", 20, 20, rng)
    for (source, split), names in lists.items():
        folder = voc / "ImageSets" / "Segmentation" if source == "voc" else sbd
        (folder / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    train_aug = sorted({n for (s, split), names in lists.items() for n in names
                        if (s, split) != ("voc", "val")} - set(lists[("voc", "val")]))
    return voc, sbd, expected, train_aug


def _check_voc_output(root: Path, expected: dict[str, np.ndarray], train_aug: list[str]) -> None:
    masks = root / "SegmentationClassAug"
    assert sorted(p.stem for p in masks.iterdir()) == sorted(expected)
    for name, want in expected.items():
        mode, got, palette = _read_png(masks / f"{name}.png")
        assert mode == "P" and palette == voc_palette().tobytes()
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == train_aug


def test_voc_rule_list_and_summary(tmp_path, capsys):
    voc, sbd, expected, train_aug = make_voc_sbd(tmp_path)
    assert train_aug == ["2007_000001", "2007_000002", "2008_000001", "2008_000002", "2008_000003", "2008_000004"]
    # the rule matters here: SBD's mask of an image VOC also segments is a different one
    assert not np.array_equal(expected["2007_000002"], prepare_voc.sbd_mask(sbd / "cls" / "2007_000002.mat"))
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]) == 0
    _check_voc_output(voc, expected, train_aug)
    out = capsys.readouterr()
    assert "SegmentationClassAug: 8 masks" in out.out and "(8 written, 0 already there, 0 replaced)" in out.out
    assert "from VOC2012 SegmentationClass: 5 (3 of them also in SBD: VOC's mask kept)" in out.out
    assert "from SBD cls: 3 (of 6 .mat files)" in out.out
    assert "train_aug.txt: 6 names (written): SBD train 4 + SBD val 3 + VOC train 3, less VOC val 2" in out.out
    assert "images without a mask: 2 of 10" in out.out
    assert "SegmentationClassAug: 8/8 (100%)" in out.err and "ETA" in out.err


def test_voc_second_run_changes_nothing_and_resumes(tmp_path, capsys):
    voc, sbd, expected, train_aug = make_voc_sbd(tmp_path)
    args = ["--voc", str(voc), "--sbd", str(sbd), "--workers", "2"]  # the pool of workers
    assert prepare_voc.main(args) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert prepare_voc.main(args) == 0
    assert _snapshot(tmp_path) == before  # not a byte, not a modification time
    assert "(0 written, 8 already there, 0 replaced)" in capsys.readouterr().out
    # an interrupted run: two masks and the list missing, a stale temporary file
    (voc / "SegmentationClassAug" / "2008_000001.png").unlink()
    (voc / "SegmentationClassAug" / "2007_000004.png").unlink()
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    stale = voc / "SegmentationClassAug" / ".2008_000001.png.tmp12345"
    stale.write_bytes(b"half a png")
    assert prepare_voc.main(args) == 0
    assert not stale.exists()
    assert "(2 written, 6 already there, 0 replaced)" in capsys.readouterr().out
    _check_voc_output(voc, expected, train_aug)
    # a grayscale copy of the same labels (as the SegmentationClassAug release ships) is the same
    Image.fromarray(expected["2008_000002"]).save(voc / "SegmentationClassAug" / "2008_000002.png")
    gray = (voc / "SegmentationClassAug" / "2008_000002.png").read_bytes()
    assert prepare_voc.main(args) == 0
    assert (voc / "SegmentationClassAug" / "2008_000002.png").read_bytes() == gray
    # a differing file found by a worker of the pool: the run stops with one line
    save_label_png(voc / "SegmentationClassAug" / "2008_000003.png", np.zeros((2, 2), np.uint8))
    capsys.readouterr()
    assert prepare_voc.main(args) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "2008_000003.png exists and differs" in err


def test_voc_never_overwrites_a_different_file_without_force(tmp_path, capsys):
    voc, sbd, expected, train_aug = make_voc_sbd(tmp_path)
    args = ["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]
    assert prepare_voc.main(args) == 0
    user_list = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    user_list.write_text("my_own_list\n")
    capsys.readouterr()
    assert prepare_voc.main(args) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "train_aug.txt exists and differs" in err and "--force" in err
    assert user_list.read_text() == "my_own_list\n"
    edited = voc / "SegmentationClassAug" / "2008_000001.png"
    changed = expected["2008_000001"].copy()
    changed[:3, :3] = 7
    save_label_png(edited, changed)
    data = edited.read_bytes()
    assert prepare_voc.main(args) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "2008_000001.png exists and differs" in err and "--force" in err
    assert edited.read_bytes() == data and user_list.read_text() == "my_own_list\n"
    assert prepare_voc.main(args + ["--force"]) == 0
    out = capsys.readouterr().out
    assert "(0 written, 7 already there, 1 replaced)" in out and "train_aug.txt: 6 names (replaced)" in out
    _check_voc_output(voc, expected, train_aug)


def test_voc_out_folder_is_a_complete_data_root(tmp_path):
    voc, sbd, expected, train_aug = make_voc_sbd(tmp_path)
    out = tmp_path / "prepared"
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("an_older_list\n")  # not copied
    source = _snapshot(voc)
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd), "--out", str(out), "--workers", "1"]) == 0
    assert _snapshot(voc) == source  # the VOC folder is only read
    _check_voc_output(out, expected, train_aug)
    assert (out / "JPEGImages").is_symlink() and (out / "JPEGImages").resolve() == voc.resolve() / "JPEGImages"
    for name in ("train.txt", "val.txt"):
        assert (out / "ImageSets" / "Segmentation" / name).read_text() == \
            (voc / "ImageSets" / "Segmentation" / name).read_text()


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_voc_wrong_folders_one_line_exit_2(tmp_path, capsys):
    voc, sbd, _, _ = make_voc_sbd(tmp_path)
    # the CLI itself, once: SBD's archive root instead of its dataset folder
    run = _cli("prepare_voc", "--voc", str(voc), "--sbd", str(sbd.parent))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == (f"error: no cls/ folder under {sbd.parent}: expected SBD's "
                          "benchmark_RELEASE/dataset (of benchmark.tgz)\n")
    cases = [
        (["--voc", str(voc.parent), "--sbd", str(sbd)], f"no JPEGImages/ folder under {voc.parent}"),
        (["--voc", str(sbd), "--sbd", str(sbd)], f"no JPEGImages/ folder under {sbd}"),
        (["--voc", str(voc), "--sbd", str(voc)], f"no cls/ folder under {voc}"),
    ]
    for args, message in cases:
        assert prepare_voc.main(args) == 2
        err = capsys.readouterr().err
        assert _one_error(err) and message in err, err
    (sbd / "val.txt").unlink()
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd)]) == 2
    assert f"no val.txt file under {sbd}" in capsys.readouterr().err
    assert not (voc / "SegmentationClassAug").exists()  # nothing written before the checks


def test_voc_bad_mat_and_incomplete_download_one_line(tmp_path, capsys):
    voc, sbd, _, _ = make_voc_sbd(tmp_path)
    scipy_io.savemat(str(sbd / "cls" / "2008_000001.mat"), {"GTinst": {"Segmentation": np.zeros((4, 4))}})
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "2008_000001.mat has no GTcls.Segmentation" in err
    (sbd / "cls" / "2008_000001.mat").unlink()
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "1 names of train_aug / val have no mask" in err and "e.g. 2008_000001" in err


def test_missing_data_extra_is_one_line(tmp_path, capsys, monkeypatch):
    voc, sbd, _, _ = make_voc_sbd(tmp_path)
    coco, _, _ = make_coco(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io raises ImportError
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd)]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "needs scipy: pip install -e \".[data]\"" in err
    assert prepare_coco.main(["--coco", str(coco)]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "needs pycocotools: pip install -e \".[data]\"" in err


def test_unwritable_output_is_one_line(tmp_path, capsys):
    voc, sbd, _, _ = make_voc_sbd(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # --out under a file: no folder can be made there, even as root
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd), "--out", str(blocker / "out"),
                             "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "a_file" in err


# ----------------------------------------------------------------------------------------- COCO
def _rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE, encoded here: column-major runs, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(bool)
    counts, current, run = [], False, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def _rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


CAT = {name: c + 1 for c, name in enumerate(COCO_CLASSES)}  # our label of each category
# COCO's category ids have gaps (1..90): person 1, ..., dining table 67, cup 47, couch 63
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def make_coco(base: Path, seed: int = 0) -> tuple[Path, dict[str, dict[str, np.ndarray]], dict[str, list[str]]]:
    """COCO_DIR with train2014/, val2014/, annotations/; expected masks under both crowd rules; lists."""
    rng = np.random.default_rng(seed)
    coco = base / "coco"
    (coco / "annotations").mkdir(parents=True)
    expected = {"class": {}, "ignore": {}}
    lists = {"train": [], "val": []}
    cat_id = dict(zip(COCO_CLASSES, COCO_IDS))
    ann_id = 100
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        images, anns = [], []
        specs = _coco_specs(split)
        for k, (h, w, objects) in enumerate(specs):
            image_id = 1000 * (split == "val") + k + 1
            file_name = f"COCO_{folder}_{image_id:012d}.jpg"
            _jpeg(coco / folder / file_name, h, w, rng)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            want_class, want_ignore = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
            crowd_pix, inst_pix = np.zeros((h, w), bool), np.zeros((h, w), bool)
            drawn = []
            for name, kind, geometry, crowd in objects:
                ann_id += 1
                pixels = np.zeros((h, w), bool)
                if kind == "poly":  # a list of rectangles: the polygon parts of one object
                    segmentation = []
                    for (x0, y0, x1, y1) in geometry:
                        pixels[y0:y1, x0:x1] = True
                        segmentation.append(_rect(x0, y0, x1, y1))
                else:  # a region given as pixels: RLE, uncompressed or compressed
                    for (x0, y0, x1, y1) in geometry:
                        pixels[y0:y1, x0:x1] = True
                    pixels &= np.add.outer(np.arange(h), np.arange(w)) % 5 != 0  # not a rectangle
                    if kind == "rle":
                        segmentation = {"size": [h, w], "counts": _rle_counts(pixels)}
                    else:
                        code = mask_utils.encode(np.asfortranarray(pixels.astype(np.uint8)))
                        segmentation = {"size": [h, w], "counts": code["counts"].decode()}
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_id[name],
                             "segmentation": segmentation, "iscrowd": int(crowd),
                             "area": float(pixels.sum()), "bbox": [0, 0, 1, 1]})
                drawn.append((-int(pixels.sum()), ann_id, CAT[name], crowd, pixels))
            for _, _, cls, crowd, pixels in sorted(drawn, key=lambda d: d[:2]):  # largest first
                want_class[pixels] = cls
                if crowd:
                    crowd_pix |= pixels
                else:
                    want_ignore[pixels] = cls
                    inst_pix |= pixels
            want_ignore[crowd_pix & ~inst_pix] = 255
            stem = Path(file_name).stem
            expected["class"][f"{folder}/{stem}"] = want_class
            expected["ignore"][f"{folder}/{stem}"] = want_ignore
            if objects:
                lists[split].append(stem)
        categories = [{"id": cat_id[n], "name": n, "supercategory": "x"} for n in COCO_CLASSES]
        (coco / "annotations" / f"instances_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return coco, expected, lists


def _coco_specs(split: str):
    """(H, W, [(category, kind, rectangles, iscrowd)]) per image."""
    if split == "train":
        return [
            # a cup (polygon) on a dining table (polygon, larger, listed after it): the cup stays on top
            (32, 40, [("cup", "poly", [(10, 8, 18, 16)], False),
                      ("dining table", "poly", [(2, 4, 30, 24)], False)]),
            # a crowd of people (uncompressed RLE) behind one person (a polygon in two parts) and a dog (compressed RLE)
            (36, 44, [("person", "rle", [(0, 0, 40, 30)], True),
                      ("person", "poly", [(5, 5, 12, 25), (14, 5, 18, 9)], False),
                      ("dog", "rlec", [(20, 10, 36, 34)], False)]),
            # only a crowd (of cars): class under --crowd class, unlisted under --crowd ignore
            (28, 28, [("car", "rle", [(3, 3, 25, 20)], True)]),
            (24, 32, []),  # no annotation: all background, not listed
        ]
    return [
        (30, 30, [("toothbrush", "poly", [(1, 1, 9, 29)], False),
                  ("person", "rlec", [(5, 10, 25, 20)], False)]),  # overlapping, the smaller on top
        (26, 34, [("couch", "poly", [(0, 10, 34, 26)], False)]),
    ]


def _check_coco_output(root: Path, expected: dict[str, np.ndarray], lists: dict[str, list[str]]) -> None:
    for folder in ("train2014", "val2014"):
        found = sorted(f"{folder}/{p.stem}" for p in (root / "SegmentationClass" / folder).iterdir())
        assert found == sorted(k for k in expected if k.startswith(folder))
    for key, want in expected.items():
        mode, got, palette = _read_png(root / "SegmentationClass" / f"{key}.png")
        assert mode == "P" and palette == voc_palette().tobytes()
        np.testing.assert_array_equal(got, want, err_msg=key)
    for split, names in lists.items():
        assert (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split() == sorted(names)


def test_coco_masks_rule_and_second_run(tmp_path, capsys):
    coco, expected, lists = make_coco(tmp_path)
    # the fixture means what it says: the cup is inside the table, the person crowd under the person
    cup = expected["class"]["train2014/COCO_train2014_000000000001"]
    assert (cup == CAT["cup"]).sum() == 64 and (cup == CAT["dining table"]).sum() == 28 * 20 - 64
    args = ["--coco", str(coco), "--workers", "2"]
    assert prepare_coco.main(args) == 0
    _check_coco_output(coco, expected["class"], lists)
    for folder in ("train2014", "val2014"):
        assert (coco / "JPEGImages" / folder).resolve() == (coco / folder).resolve()
    out = capsys.readouterr()
    assert "train2014: 4 images, 6 annotations (2 crowd regions: painted as their category)" in out.out
    assert "SegmentationClass/train2014: 4 masks (4 written, 0 already there, 0 replaced)" in out.out
    assert "images without an object: 1 without any annotation (mask all background), 0 whose" in out.out
    assert "ImageSets/Segmentation/train.txt: 3 names (written)" in out.out
    assert "SegmentationClass/val2014: 2/2 (100%)" in out.err and "ETA" in out.err
    before = _snapshot(coco)
    assert prepare_coco.main(args) == 0
    assert _snapshot(coco) == before
    assert "(0 written, 4 already there, 0 replaced)" in capsys.readouterr().out


def test_coco_crowd_ignore_out_and_copies(tmp_path, capsys):
    coco, expected, lists = make_coco(tmp_path)
    out = tmp_path / "voc_style"
    args = ["--coco", str(coco), "--out", str(out), "--crowd", "ignore", "--copy-images", "--workers", "1"]
    assert prepare_coco.main(args) == 0
    ignore_lists = {"train": [n for n in lists["train"] if n != "COCO_train2014_000000000003"], "val": lists["val"]}
    _check_coco_output(out, expected["ignore"], ignore_lists)
    assert (expected["ignore"]["train2014/COCO_train2014_000000000003"] == 255).any()
    for folder in ("train2014", "val2014"):
        images = out / "JPEGImages" / folder
        assert not images.is_symlink()
        assert {p.name: p.read_bytes() for p in images.iterdir()} == \
            {p.name: p.read_bytes() for p in (coco / folder).iterdir()}
    assert "1 whose annotations leave no class pixel; neither is listed" in capsys.readouterr().out
    # another rule on the same folder is a different mask: refused without --force
    before = _snapshot(out)
    assert prepare_coco.main(args[:-5] + ["--copy-images", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and "exists and differs" in err and "--force" in err
    assert _snapshot(out) == before


def test_coco_wrong_folders_one_line_exit_2(tmp_path, capsys):
    coco, _, _ = make_coco(tmp_path)
    run = _cli("prepare_coco", "--coco", str(tmp_path))
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"error: no train2014/ folder under {tmp_path}: expected COCO 2014's folder")
    (coco / "annotations" / "instances_val2014.json").unlink()
    assert prepare_coco.main(["--coco", str(coco)]) == 2
    err = capsys.readouterr().err
    assert _one_error(err) and f"no instances_val2014.json file under {coco / 'annotations'}" in err
    assert prepare_coco.main(["--coco", str(tmp_path / "nowhere")]) == 2
    assert "no folder" in capsys.readouterr().err
    (coco / "annotations" / "instances_val2014.json").write_text("{not json")
    assert prepare_coco.main(["--coco", str(coco)]) == 2
    assert "instances_val2014.json cannot be read as JSON" in capsys.readouterr().err
    assert not (coco / "SegmentationClass" / "val2014").exists()


# ------------------------------------------------------------------- from the prepared layouts to training
def _train(data: str, root: Path, out: Path):
    from more_fast.cli import config_from_args
    from more_fast.training import Trainer

    cfg = config_from_args(["--data", data, "--data-root", str(root), "--backbone", "vit_tiny_patch16_224",
                            "--depth", "2", "--patch-size", "8", "--pretrained", "none", "--crop-size", "32",
                            "--iters", "2", "--batch-size", "2", "--workers", "0", "--kernels", "reference",
                            "--device", "cpu", "--cam-scales", "1.0", "--set", "decoder_dim=16",
                            "--out", str(out)])
    trainer = Trainer(cfg, log=lambda line: None)
    return trainer, trainer.run()


def _labels(masks, num_classes: int) -> np.ndarray:
    out = np.zeros((len(masks), num_classes), np.float32)
    for row, mask in enumerate(masks):
        present = [v for v in np.unique(mask) if 0 < v < 255]
        out[row, np.asarray(present, int) - 1] = 1
    return out


@pytest.mark.slow
def test_prepared_voc_and_coco_train(tmp_path, monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")
    voc, sbd, expected, train_aug = make_voc_sbd(tmp_path / "v")
    assert prepare_voc.main(["--voc", str(voc), "--sbd", str(sbd), "--workers", "1"]) == 0
    trainer, results = _train("voc", voc, tmp_path / "run_voc")
    assert trainer.train_set.names == train_aug and len(trainer.val_set) == 2
    np.testing.assert_array_equal(trainer.train_set.cls_labels, _labels([expected[n] for n in train_aug], 20))
    assert set(results) >= {"cam", "aux_cam", "lam", "decoder"}
    assert (tmp_path / "run_voc" / "checkpoints" / "ckpt_00000002.pt").is_file()

    coco, expected, lists = make_coco(tmp_path / "c")
    assert prepare_coco.main(["--coco", str(coco), "--workers", "1"]) == 0
    trainer, results = _train("coco", coco, tmp_path / "run_coco")
    assert trainer.train_set.names == sorted(lists["train"])
    np.testing.assert_array_equal(trainer.train_set.cls_labels,
                                  _labels([expected["class"][f"train2014/{n}"] for n in sorted(lists["train"])], 80))
    assert set(results) >= {"cam", "aux_cam", "lam", "decoder"}
    assert (tmp_path / "run_coco" / "checkpoints" / "ckpt_00000002.pt").is_file()
