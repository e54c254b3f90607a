"""The PASCAL VOC colour map, and label maps written as palette PNGs.

VOC stores segmentation masks as palette-mode PNGs: the pixel values are the class indices
(0 = background, c + 1 = class c, 255 = ignore) and the palette only makes them viewable. We
write every mask (synthetic ground truth, predicted maps) the same way so that any VOC tool
reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# the label of pixels and patches that count for nothing (VOC's object borders, uncertain pseudo
# labels); every module of the project reads it from here
IGNORE_INDEX = 255


def voc_palette() -> np.ndarray:
    """The standard 256-entry VOC colour map (256 x 3 uint8): bits of the index spread over RGB."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            palette[:, channel] |= bit << (7 - shift)
    return palette.astype(np.uint8)


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an H x W label map (values 0..255) as a palette PNG with the VOC colours."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be H x W, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    height, width = label.shape
    pixels = np.ascontiguousarray(label, dtype=np.uint8).tobytes()
    image = Image.frombytes("P", (width, height), pixels)
    image.putpalette(voc_palette().tobytes())
    image.save(Path(path), format="PNG")
