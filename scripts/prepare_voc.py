#!/usr/bin/env python
"""Build VOC 2012's SegmentationClassAug and the train_aug list from the two public downloads.

    python scripts/prepare_voc.py --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset [--out DIR]

Inputs: VOC2012 trainval (VOCtrainval_11-May-2012.tar: JPEGImages/, SegmentationClass/,
ImageSets/Segmentation/{train,val}.txt) and the SBD release (benchmark.tgz: its
benchmark_RELEASE/dataset, with cls/*.mat, train.txt, val.txt). Needs scipy (the `data` extra:
`pip install -e ".[data]"`) to read SBD's .mat files.

Writes, in the VOC folder or under --out (which then also gets a JPEGImages link and VOC's split
lists, so that it is a complete --data-root):
  SegmentationClassAug/<name>.png   one mask per image that VOC or SBD segments (12,031 on the
                                    real data): palette PNGs (VOC colours), values 0 background,
                                    c + 1 class c, 255 ignore
  ImageSets/Segmentation/train_aug.txt   SBD train + SBD val + VOC train, less VOC val, sorted
                                    (10,582 names on the real data)

Where both have a mask (the VOC 2012 segmentation images that SBD also annotates, 2,237 on the
real data by the counts below) VOC 2012's own SegmentationClass mask is kept, with its 255 object
borders and "difficult" regions; SBD's mask (no ignore pixels: GTcls.Segmentation holds 0..20
only) is used for the images VOC does not segment. This is the rule of the widely used
SegmentationClassAug release (the DeepLab one, mirrored as SegmentationClassAug.zip): its recipe
(DeepLab v2 / train-DeepLab) converts SBD's cls/*.mat to PNG and then copies VOC 2012's
SegmentationClass masks over them; its 12,031 files are the union 11,355 SBD + 2,913 VOC less
the overlap; the VOC val masks in it are VOC's (val scores computed on it are the standard ones,
and users report that some of its masks have 255 borders and others none, the SBD ones).
Uncertainty: we have not compared against that archive's files byte for byte; if your copy
differs on some images, this script says so (a differing file is never overwritten without
--force).

Idempotent and resumable: every file is written atomically; a file already there with the same
labels (whatever its PNG encoding or palette: a grayscale copy of the release counts as the
same) is kept untouched; a different one stops the run with one line unless --force.
Progress with ETA on stderr, a summary on stdout. A wrong folder: one line naming what is
missing, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from more_fast.cli import positive_int
from more_fast.data import prepare as P
from more_fast.data.labels import read_mask

NUM_CLASSES = 20
VOC_EXPECTED = "VOC2012's folder (VOCdevkit/VOC2012 of VOCtrainval_11-May-2012.tar)"
SBD_EXPECTED = "SBD's benchmark_RELEASE/dataset (of benchmark.tgz)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", required=True, type=Path,
                        help="VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/)")
    parser.add_argument("--sbd", required=True, type=Path,
                        help="SBD's benchmark_RELEASE/dataset (cls/, train.txt, val.txt)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: the VOC folder); gets a JPEGImages link and VOC's lists")
    parser.add_argument("--force", action="store_true", help="overwrite output files that differ")
    parser.add_argument("--workers", type=positive_int, default=P.default_workers(),
                        help="processes converting masks (default: the usable cores, at most 8)")
    return parser


def read_names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def sbd_mask(path: Path) -> np.ndarray:
    """GTcls.Segmentation of an SBD cls/*.mat: H x W uint8, 0..20."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError):
        raise P.PrepareError(f"{path} has no GTcls.Segmentation: expected SBD's cls/*.mat files") from None
    except Exception as err:  # scipy raises ValueError, TypeError, OSError... for a broken file
        raise P.PrepareError(f"{path} cannot be read as a .mat file: {type(err).__name__}: {err}") from None
    if seg.ndim != 2 or seg.size == 0:
        raise P.PrepareError(f"{path}: GTcls.Segmentation has shape {seg.shape}, expected H x W")
    if seg.min() < 0 or seg.max() > NUM_CLASSES:
        raise P.PrepareError(f"{path}: GTcls.Segmentation holds {int(seg.max())}, outside 0..{NUM_CLASSES}")
    return seg.astype(np.uint8)


def voc_mask(path: Path) -> np.ndarray:
    """A VOC SegmentationClass PNG: its palette indices, 0..20 and 255."""
    try:
        mask = read_mask(path)
    except (OSError, SyntaxError, ValueError) as err:
        raise P.PrepareError(f"{path} cannot be read as a VOC mask: {err}") from None
    stray = np.setdiff1d(np.unique(mask), np.r_[0:NUM_CLASSES + 1, 255])
    if stray.size:
        raise P.PrepareError(f"{path} holds value {int(stray[0])}, outside 0..{NUM_CLASSES} and 255")
    return mask


def convert(task: tuple) -> tuple[str, str, str]:
    """One mask: (name, source, src, dst, image, force) -> (name, source, status)."""
    name, source, src, dst, image, force = task
    mask = voc_mask(src) if source == "voc" else sbd_mask(src)
    if image.is_file():
        with Image.open(image) as pil:
            if pil.size != (mask.shape[1], mask.shape[0]):
                raise P.PrepareError(f"{src} is {mask.shape[0]} x {mask.shape[1]}, its image {image} "
                                     f"{pil.size[1]} x {pil.size[0]}")
    status = P.write_mask(dst, mask, force, f"the mask made from {src}")
    return name, source, status


def check_inputs(voc: Path, sbd: Path) -> None:
    for name in ("JPEGImages", "SegmentationClass"):
        P.require(voc / name, "dir", VOC_EXPECTED)
    lists = P.require(voc / "ImageSets" / "Segmentation", "dir", VOC_EXPECTED)
    for name in ("train.txt", "val.txt"):
        P.require(lists / name, "file", VOC_EXPECTED)
    P.require(sbd / "cls", "dir", SBD_EXPECTED)
    for name in ("train.txt", "val.txt"):
        P.require(sbd / name, "file", SBD_EXPECTED)


def prepare(args: argparse.Namespace) -> list[str]:
    """Do the work; the summary lines."""
    voc, sbd = args.voc, args.sbd
    check_inputs(voc, sbd)
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        raise P.PrepareError('reading SBD\'s .mat files needs scipy: pip install -e ".[data]" '
                             "(or pip install scipy)") from None
    out = args.out if args.out is not None else voc
    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_names(lists / "train.txt"), read_names(lists / "val.txt")
    sbd_train, sbd_val = read_names(sbd / "train.txt"), read_names(sbd / "val.txt")

    voc_masks = {p.stem: p for p in (voc / "SegmentationClass").glob("*.png")}
    sbd_masks = {p.stem: p for p in (sbd / "cls").glob("*.mat")}
    if not voc_masks:
        raise P.PrepareError(f"no .png masks in {voc / 'SegmentationClass'}: expected {VOC_EXPECTED}")
    if not sbd_masks:
        raise P.PrepareError(f"no .mat files in {sbd / 'cls'}: expected {SBD_EXPECTED}")

    # the list first, checked before anything is written: every name needs an image and a mask
    train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
    no_mask = [n for n in train_aug + voc_val if n not in voc_masks and n not in sbd_masks]
    if no_mask:
        raise P.PrepareError(f"{len(no_mask)} names of train_aug / val have no mask in "
                             f"{voc / 'SegmentationClass'} or {sbd / 'cls'}, e.g. {no_mask[0]}: "
                             "is a download incomplete?")
    no_image = [n for n in train_aug + voc_val if not (voc / "JPEGImages" / f"{n}.jpg").is_file()]
    if no_image:
        raise P.PrepareError(f"{len(no_image)} listed names have no image in {voc / 'JPEGImages'}, "
                             f"e.g. {no_image[0]}.jpg: is the VOC download incomplete?")

    mask_dir = out / "SegmentationClassAug"
    P.remove_stale(mask_dir)
    tasks = []
    for name in sorted(set(voc_masks) | set(sbd_masks)):
        source = "voc" if name in voc_masks else "sbd"  # VOC's own mask wins where both have one
        src = voc_masks[name] if source == "voc" else sbd_masks[name]
        tasks.append((name, source, src, mask_dir / f"{name}.png", voc / "JPEGImages" / f"{name}.jpg",
                      args.force))
    results = list(P.run_tasks(convert, tasks, args.workers, "SegmentationClassAug"))
    statuses = P.count(status for _, _, status in results)

    extra = []
    if out.resolve() != voc.resolve():  # a complete data root: images and VOC's lists too
        extra.append(("JPEGImages", P.link_dir(out / "JPEGImages", voc / "JPEGImages", args.force)))
        for path in sorted(p for p in lists.glob("*.txt") if p.name != "train_aug.txt"):  # ours is made below
            extra.append((path.name, P.write_text(out / "ImageSets" / "Segmentation" / path.name,
                                                  path.read_text(), args.force, str(path))))
    list_status = P.write_text(out / "ImageSets" / "Segmentation" / "train_aug.txt",
                               "\n".join(train_aug) + "\n", args.force, "the train_aug list made here")

    both = len(set(voc_masks) & set(sbd_masks))
    images = {p.stem for p in (voc / "JPEGImages").glob("*.jpg")}
    no_mask_images = len(images - set(voc_masks) - set(sbd_masks))
    lines = [
        f"SegmentationClassAug: {len(tasks)} masks in {mask_dir} ({P.describe(statuses)})",
        f"  from VOC2012 SegmentationClass: {len(voc_masks)} ({both} of them also in SBD: VOC's mask kept)",
        f"  from SBD cls: {len(sbd_masks) - both} (of {len(sbd_masks)} .mat files)",
        f"train_aug.txt: {len(train_aug)} names ({list_status}): SBD train {len(set(sbd_train))} + SBD val "
        f"{len(set(sbd_val))} + VOC train {len(set(voc_train))}, less VOC val {len(set(voc_val))} and the "
        f"names in two lists (real data: 10582)",
        f"images without a mask: {no_mask_images} of {len(images)} in {voc / 'JPEGImages'} "
        "(in no segmentation list: detection-only images)",
    ]
    if extra:
        lines.append("also in " + str(out) + ": " + ", ".join(f"{name} ({status})" for name, status in extra))
    lines.append(f"next: python scripts/train.py --data voc --data-root {out}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lines = prepare(args)
    except (P.PrepareError, OSError) as err:  # OSError: e.g. an output folder that is not writable
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the files written so far are whole; rerun to resume", file=sys.stderr)
        return 130
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
