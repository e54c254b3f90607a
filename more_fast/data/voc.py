"""Segmentation data sets in the PASCAL VOC layout (README, Real data): VOC 2012 + SBD, and the synthetic set.

A data set is a split list of names, one image and (optionally) one mask per name, and
image-level labels derived from the masks. Training samples are the recipe's augmentations (docs/METHOD.md, VOC recipe) at
crop_size x crop_size; evaluation samples are resized to crop_size x crop_size, as the
published validation at 448 x 448. Images stay uint8 (see `transforms.normalize`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from more_fast.data.labels import (cached_labels, labels_from_annotations, labels_from_masks,
                                   read_mask, resolve_cache_dir)
from more_fast.data.transforms import apply_joint, check_crop_size, eval_transform, train_transform

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

from more_fast.data.palette import IGNORE_INDEX


class BadSample(ValueError):
    """An image or mask of a split that cannot be decoded, or a mask whose size is not its image's.

    Found when a sample is read (possibly in a DataLoader worker), long after the data set was
    listed; `path` is the offending file, `split` its split, and the message is one line."""

    def __init__(self, message: str, path: str | os.PathLike = "", split: str = "") -> None:
        super().__init__(message)
        self.path, self.split = str(path), split


# what PIL raises for a file it cannot decode: unidentified or truncated data (OSError), a
# corrupt header (SyntaxError), a bad mode (ValueError, from read_mask), a decompression bomb
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode_error(what: str, path: Path, split: str, err: BaseException) -> BadSample:
    reason = " ".join(str(err).split()) or type(err).__name__
    return BadSample(f"{what} {path} (split {split!r}) cannot be decoded: {type(err).__name__}: {reason}",
                     path, split)


def read_split(root: str | os.PathLike, split: str,
               split_list: str | os.PathLike | None = None) -> list[str]:
    """Names listed in `split_list`, default `<root>/ImageSets/Segmentation/<split>.txt`.

    A line may also be a path pair (`/JPEGImages/x.jpg /SegmentationClassAug/x.png`, as in
    some DeepLab lists): its first entry's stem is the name.
    """
    path = Path(split_list) if split_list is not None else (
        Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt")
    if not path.is_file():
        raise FileNotFoundError(f"split list for split {split!r} not found: {path}")
    names = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = line.split()[0]
        is_path = "/" in entry or entry.endswith((".jpg", ".png"))
        names.append(PurePosixPath(entry).stem if is_path else entry)
    if not names:
        raise ValueError(f"split list for split {split!r} is empty: {path}")
    return names


def _all_or_none(paths: Sequence[Path], what: str, split: str) -> bool:
    """True if every path exists, False if none does; a partial set is an error."""
    exists = [path.is_file() for path in paths]
    if all(exists):
        return True
    if any(exists):
        missing = paths[exists.index(False)]
        raise FileNotFoundError(f"{what} {missing} (split {split!r}) not found")
    return False


class SegmentationDataset(Dataset):
    """`root/image_dir/<name>.jpg` + `root/mask_dir/<name>.png` for each name of a split.

    Samples are dicts: `image` uint8 3 x crop x crop, `mask` int64 crop x crop (0 background,
    c + 1 class c, 255 ignore), `cls_label` float32 (num_classes,), `name`, `index`.
    A split without masks (VOC test) gets all-255 masks and labels from
    `root/Annotations/<name>.xml` when those exist and `class_names` is given, else zeros.
    """

    def __init__(self, root: str | os.PathLike, split: str, num_classes: int, train: bool,
                 crop_size: int, image_dir: str = "JPEGImages",
                 mask_dir: str = "SegmentationClassAug",
                 split_list: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        check_crop_size(crop_size)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries for "
                             f"num_classes={num_classes}")
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.train, self.crop_size = train, crop_size
        self.class_names = tuple(class_names or (f"class_{c}" for c in range(num_classes)))
        self.names = read_split(root, split, split_list)
        self.image_paths = [self.root / image_dir / f"{name}.jpg" for name in self.names]
        for path in self.image_paths:
            if not path.is_file():
                raise FileNotFoundError(f"image {path} (split {split!r}) not found")
        self.mask_paths = [self.root / mask_dir / f"{name}.png" for name in self.names]
        self.has_masks = _all_or_none(self.mask_paths, "mask", split)
        try:
            self.cls_labels = self._image_labels(cache_dir, class_names)
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise self._undecodable_mask(err) from err
        self.transform = train_transform(crop_size) if train else eval_transform(crop_size)

    def _image_labels(self, cache_dir: str | os.PathLike | None,
                      class_names: Sequence[str] | None) -> np.ndarray:
        if self.has_masks:
            sources = self.mask_paths
            compute = partial(labels_from_masks, sources, self.num_classes)
        else:
            sources = [self.root / "Annotations" / f"{name}.xml" for name in self.names]
            if class_names is None or not _all_or_none(sources, "annotation", self.split):
                return np.zeros((len(self.names), self.num_classes), dtype=np.float32)
            compute = partial(labels_from_annotations, sources, class_names)
        return cached_labels(resolve_cache_dir(self.root, cache_dir), self.split, sources,
                             self.num_classes, compute)

    def _undecodable_mask(self, err: BaseException) -> BaseException:
        """The first mask that cannot be decoded, named (PIL's own message may omit the file)."""
        for path in self.mask_paths if self.has_masks else ():
            try:
                read_mask(path)
            except _DECODE_ERRORS as bad:
                return _decode_error("mask", path, self.split, bad)
        return err

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded image (uint8 3 x H x W) and mask (uint8 H x W) of sample `index`, untransformed.

        Raises BadSample naming the file when either cannot be decoded or their sizes disagree."""
        image_path = self.image_paths[index]
        try:
            with Image.open(image_path) as pil:
                image = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
        except _DECODE_ERRORS as err:
            raise _decode_error("image", image_path, self.split, err) from err
        if self.has_masks:
            try:
                mask = torch.from_numpy(read_mask(self.mask_paths[index]))
            except _DECODE_ERRORS as err:
                raise _decode_error("mask", self.mask_paths[index], self.split, err) from err
            if mask.shape != image.shape[1:]:
                raise BadSample(f"mask {self.mask_paths[index]} is {tuple(mask.shape)}, image "
                                f"{image_path} is {tuple(image.shape[1:])} (split {self.split!r})",
                                self.mask_paths[index], self.split)
        else:
            mask = torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.uint8)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        image, mask = self.load(index)
        image, mask = apply_joint(self.transform, image, mask)
        return {"image": image, "mask": mask.long(),
                "cls_label": torch.tensor(self.cls_labels[index]),
                "name": self.names[index], "index": index}


def voc_dataset(root: str | os.PathLike, split: str, train: bool, crop_size: int,
                split_list: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None) -> SegmentationDataset:
    """VOC 2012 (20 classes): SegmentationClassAug masks, or SegmentationClass without SBD."""
    mask_dir = "SegmentationClassAug"
    if not (Path(root) / mask_dir).is_dir() and (Path(root) / "SegmentationClass").is_dir():
        mask_dir = "SegmentationClass"
    return SegmentationDataset(root, split, len(VOC_CLASSES), train, crop_size,
                               mask_dir=mask_dir, split_list=split_list, cache_dir=cache_dir,
                               class_names=VOC_CLASSES)
