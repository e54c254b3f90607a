"""Data: VOC / COCO loaders, the built-in synthetic set, transforms and palettes."""

from more_fast.data.coco import COCO_CLASSES, coco_dataset
from more_fast.data.palette import save_label_png, voc_palette
from more_fast.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_voc
from more_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from more_fast.data.voc import (IGNORE_INDEX, VOC_CLASSES, SegmentationDataset, read_split,
                                voc_dataset)

__all__ = [
    "COCO_CLASSES", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "SYNTHETIC_CLASSES",
    "VOC_CLASSES", "SegmentationDataset", "coco_dataset", "denormalize", "make_synthetic_voc",
    "normalize", "read_split", "save_label_png", "voc_dataset", "voc_palette",
]
