#!/usr/bin/env python
"""Build the VOC-style COCO 2014 layout that `--data coco` reads, from the public downloads.

    python scripts/prepare_coco.py --coco COCO_DIR [--out DIR] [--crowd class|ignore] [--copy-images]

Inputs (train2014.zip, val2014.zip, annotations_trainval2014.zip): COCO_DIR/train2014/*.jpg,
COCO_DIR/val2014/*.jpg, COCO_DIR/annotations/instances_{train,val}2014.json. Needs pycocotools
(the `data` extra: `pip install -e ".[data]"`), the COCO API's own decoder of polygons and RLE.

Writes, in COCO_DIR or under --out:
  JPEGImages/{train2014,val2014}          links to the image folders (--copy-images: copies)
  SegmentationClass/{train2014,val2014}/<name>.png   one mask per image of the JSON: palette PNGs,
                                          0 background, c + 1 for the c-th of the 80 categories in
                                          COCO's id order (1 person ... 80 toothbrush, the order of
                                          more_fast.data.COCO_CLASSES), 255 ignore (--crowd ignore)
  ImageSets/Segmentation/{train,val}.txt  the images whose mask holds a class (real data: about
                                          82,081 and 40,137, the lists of the WSSS literature; an
                                          image without any annotation has no image label to learn)

The painting rule, per image:
  * every annotation is decoded with pycocotools (polygons: frPyObjects + merge; uncompressed and
    compressed RLE alike) and painted with its category, in order of decreasing mask area (pixel
    count; equal areas by annotation id): where instances overlap, the smaller one wins. A small
    object on or in front of a large one (a cup on a dining table, a person on a couch) stays
    visible, and no category that is annotated vanishes behind a larger instance, so the image
    labels derived from the masks are the annotated categories.
  * crowd regions (iscrowd = 1, an RLE over a group of objects), --crowd class (the default):
    painted with their category like any instance, in the same area order, so an image whose only
    people are a crowd keeps its `person` label (as the published WSSS image labels, which come
    from every annotation). --crowd ignore: their pixels that no non-crowd instance covers are 255
    (ignored by the losses and mIoU), as COCO's own evaluation ignores crowd regions.
  * pixels of no annotation are background (0).

Idempotent and resumable: every file is written atomically; a file already there with the same
labels is kept untouched; a different one stops the run with one line unless --force. Progress
with ETA on stderr, a summary on stdout. A wrong folder: one line naming what is missing, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from more_fast.cli import positive_int
from more_fast.data import prepare as P
from more_fast.data.coco import COCO_CLASSES
from more_fast.data.palette import IGNORE_INDEX as IGNORE

SPLITS = {"train": "train2014", "val": "val2014"}
EXPECTED = ("COCO 2014's folder: train2014/, val2014/ (train2014.zip, val2014.zip) and "
            "annotations/instances_{train,val}2014.json (annotations_trainval2014.zip)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", required=True, type=Path,
                        help="folder with train2014/, val2014/ and annotations/")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the COCO folder)")
    parser.add_argument("--splits", nargs="+", choices=sorted(SPLITS), default=["train", "val"],
                        help="which splits to prepare (default: train val)")
    parser.add_argument("--crowd", choices=("class", "ignore"), default="class",
                        help="crowd regions: painted with their category (default), or 255 where no "
                             "instance covers them")
    parser.add_argument("--copy-images", action="store_true",
                        help="copy the images into JPEGImages/ instead of linking the folders")
    parser.add_argument("--force", action="store_true", help="overwrite output files that differ")
    parser.add_argument("--workers", type=positive_int, default=P.default_workers(),
                        help="processes writing masks (default: the usable cores, at most 8)")
    return parser


def decode(segmentation, height: int, width: int, where: str) -> np.ndarray:
    """An annotation's segmentation (polygons, or RLE compressed or not) as an H x W bool mask."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):  # polygons: one object, possibly in several parts
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
        elif isinstance(segmentation, dict):
            rle = segmentation  # compressed RLE
        else:
            raise TypeError(f"a {type(segmentation).__name__}")
        if isinstance(segmentation, dict) and list(segmentation.get("size", ())) != [height, width]:
            raise ValueError(f"size {segmentation.get('size')}, the image is {height} x {width}")
        with warnings.catch_warnings():  # pycocotools 2.0.x under NumPy 2: a DeprecationWarning per call
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except Exception as err:  # pycocotools raises bare Exceptions for malformed input
        raise P.PrepareError(f"{where}: cannot decode its segmentation ({type(err).__name__}: {err})") from None
    return mask.astype(bool)


def paint(height: int, width: int, anns: list[tuple[int, int, int, object]], crowd: str, where: str) -> np.ndarray:
    """The label map of one image from its annotations (id, class 1..80, iscrowd, segmentation);
    the rule of the module docstring."""
    label = np.zeros((height, width), np.uint8)
    decoded = []
    for ann_id, cls, iscrowd, segmentation in anns:
        mask = decode(segmentation, height, width, f"{where}, annotation {ann_id}")
        decoded.append((-int(mask.sum()), ann_id, cls, iscrowd, mask))
    decoded.sort(key=lambda item: item[:2])  # largest first, smaller ones painted over them
    crowd_pixels = np.zeros((height, width), bool)
    instance_pixels = np.zeros((height, width), bool)
    for _, _, cls, iscrowd, mask in decoded:
        if iscrowd and crowd == "ignore":
            crowd_pixels |= mask
            continue
        label[mask] = cls
        instance_pixels |= mask
    if crowd == "ignore":
        label[crowd_pixels & ~instance_pixels] = IGNORE
    return label


def convert(task: tuple) -> tuple[str, str, bool]:
    """One image: (name, image path, H, W, annotations, mask path, crowd, force) ->
    (name, status, whether its mask holds a class)."""
    name, image, height, width, anns, dst, crowd, force = task
    try:
        with Image.open(image) as pil:
            size = pil.size
    except (OSError, SyntaxError) as err:
        raise P.PrepareError(f"{image} cannot be read as an image: {err}") from None
    if size != (width, height):
        raise P.PrepareError(f"{image} is {size[1]} x {size[0]}, its annotation file says {height} x {width}")
    label = paint(height, width, anns, crowd, str(image))
    status = P.write_mask(dst, label, force, f"the mask made from the annotations of {image.name}")
    return name, status, bool(np.any((label > 0) & (label != IGNORE)))


def load_annotations(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise P.PrepareError(f"{path} cannot be read as JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise P.PrepareError(f"{path} has no '{key}': expected a COCO instances file")
    return data


def category_map(data: dict, path: Path) -> dict[int, int]:
    """COCO category id -> 1..80 by name, in the order of COCO_CLASSES (COCO's id order)."""
    index = {name: c + 1 for c, name in enumerate(COCO_CLASSES)}
    names = {cat["id"]: cat["name"] for cat in data["categories"]}
    foreign = sorted(set(names.values()) - set(index))
    if foreign:
        raise P.PrepareError(f"{path} names category {foreign[0]!r}, not one of the 80 COCO categories")
    return {cat_id: index[name] for cat_id, name in names.items()}


def prepare_split(args: argparse.Namespace, split: str, out: Path) -> list[str]:
    folder = SPLITS[split]
    images_dir = args.coco / folder
    ann_path = args.coco / "annotations" / f"instances_{folder}.json"
    data = load_annotations(ann_path)
    classes = category_map(data, ann_path)
    by_image: dict[int, list] = {}
    crowds = 0
    for ann in data["annotations"]:
        if ann["category_id"] not in classes:
            raise P.PrepareError(f"{ann_path}: annotation {ann['id']} has category {ann['category_id']}, "
                                 "not in its 'categories'")
        crowds += bool(ann.get("iscrowd", 0))
        by_image.setdefault(ann["image_id"], []).append(
            (ann["id"], classes[ann["category_id"]], int(ann.get("iscrowd", 0)), ann["segmentation"]))
    images = sorted(data["images"], key=lambda im: im["file_name"])
    missing = [im["file_name"] for im in images if not (images_dir / im["file_name"]).is_file()]
    if missing:
        raise P.PrepareError(f"{len(missing)} images of {ann_path.name} are not in {images_dir}, "
                             f"e.g. {missing[0]}: is the download incomplete?")
    del data

    extra = []
    image_out = out / "JPEGImages" / folder
    if args.copy_images:
        copies = [(images_dir / im["file_name"], image_out / im["file_name"]) for im in images]
        statuses = list(P.run_tasks(lambda pair: P.copy_file(*pair, args.force), copies, 1, f"JPEGImages/{folder}"))
        extra.append(f"JPEGImages/{folder}: {P.describe(P.count(statuses))} copies")
    elif image_out.resolve() != images_dir.resolve():
        extra.append(f"JPEGImages/{folder}: link to {images_dir} ({P.link_dir(image_out, images_dir, args.force)})")

    mask_dir = out / "SegmentationClass" / folder
    P.remove_stale(mask_dir)
    tasks = [(Path(im["file_name"]).stem, images_dir / im["file_name"], int(im["height"]), int(im["width"]),
              by_image.get(im["id"], []), mask_dir / f"{Path(im['file_name']).stem}.png", args.crowd, args.force)
             for im in images]
    results = list(P.run_tasks(convert, tasks, args.workers, f"SegmentationClass/{folder}"))
    statuses = P.count(status for _, status, _ in results)
    listed = sorted(name for name, _, has_class in results if has_class)
    list_path = out / "ImageSets" / "Segmentation" / f"{split}.txt"
    list_status = P.write_text(list_path, "\n".join(listed) + "\n", args.force, f"the {split} list made here")
    unannotated = sum(1 for im in images if im["id"] not in by_image)
    instances = sum(len(v) for v in by_image.values())
    return [
        f"{folder}: {len(images)} images, {instances} annotations ({crowds} crowd regions: "
        f"{'painted as their category' if args.crowd == 'class' else '255 where no instance covers them'})",
        f"  SegmentationClass/{folder}: {len(tasks)} masks ({P.describe(statuses)})",
        f"  images without an object: {unannotated} without any annotation (mask all background), "
        f"{len(images) - unannotated - len(listed)} whose annotations leave no class pixel; neither is listed",
        f"  {list_path.relative_to(out)}: {len(listed)} names ({list_status})",
        *(f"  {line}" for line in extra),
    ]


def prepare(args: argparse.Namespace) -> list[str]:
    coco = args.coco
    if not coco.is_dir():
        raise P.PrepareError(f"no folder {coco}: expected {EXPECTED}")
    for split in args.splits:
        P.require(coco / SPLITS[split], "dir", EXPECTED)
        annotations = P.require(coco / "annotations", "dir", EXPECTED)
        P.require(annotations / f"instances_{SPLITS[split]}.json", "file", EXPECTED)
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        raise P.PrepareError('decoding COCO\'s polygons and RLE needs pycocotools: pip install -e ".[data]" '
                             "(or pip install pycocotools)") from None
    out = args.out if args.out is not None else coco
    lines = []
    for split in args.splits:
        lines += prepare_split(args, split, out)
    lines.append(f"next: python scripts/train.py --data coco --data-root {out}")
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
