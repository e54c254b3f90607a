"""COCO 2014 in the VOC style (README, Real data): 80 classes, masks with contiguous values 0..80.

Layout: `JPEGImages/{train2014,val2014}/<name>.jpg`, `SegmentationClass/{train2014,val2014}/
<name>.png` (0 background, c + 1 = class c in the order of `COCO_CLASSES`, 255 ignore), and
split lists `ImageSets/Segmentation/{train,val}.txt` (or `split_list`).
"""

from __future__ import annotations

import os

from more_fast.data.voc import SegmentationDataset

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

_SUBFOLDERS = {"train": "train2014", "val": "val2014"}


def coco_dataset(root: str | os.PathLike, split: str, train: bool, crop_size: int,
                 split_list: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> SegmentationDataset:
    """The `train` or `val` split, read from the matching 2014 subfolders."""
    if split not in _SUBFOLDERS:
        raise ValueError(f"COCO split must be one of {sorted(_SUBFOLDERS)}, got {split!r}")
    folder = _SUBFOLDERS[split]
    return SegmentationDataset(root, split, len(COCO_CLASSES), train, crop_size,
                               image_dir=f"JPEGImages/{folder}",
                               mask_dir=f"SegmentationClass/{folder}", split_list=split_list,
                               cache_dir=cache_dir, class_names=COCO_CLASSES)
