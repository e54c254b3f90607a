"""Image-level labels, derived once from the masks (or VOC XML annotations) and cached.

Why cache: reading the 10,582 masks of VOC train_aug (or COCO's 82,783) takes from tens of
seconds to minutes, and every run needs the labels before its first step. The cache file
name carries a digest of the number of classes and every source file's path, size and
modification time, so a regenerated or edited data set never serves stale labels.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CACHE_DIRNAME = ".more_fast_cache"


def read_mask(path: Path) -> np.ndarray:
    """An H x W uint8 label map from a palette (or grayscale) PNG."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"mask {path} has mode {image.mode!r}; expected a palette (P) or "
                             "grayscale (L) PNG of class indices")
        return np.array(image, dtype=np.uint8)


def labels_from_masks(paths: Sequence[Path], num_classes: int) -> np.ndarray:
    """N x K float32: class c is present if any pixel has value c + 1 (0 and 255 ignored)."""
    labels = np.zeros((len(paths), num_classes), dtype=np.float32)
    for row, path in enumerate(paths):
        counts = np.bincount(read_mask(path).ravel(), minlength=256)
        stray = np.flatnonzero(counts[num_classes + 1:255])
        if stray.size:
            raise ValueError(f"mask {path} holds value {stray[0] + num_classes + 1}, outside "
                             f"0..{num_classes} and 255 for {num_classes} classes")
        labels[row] = counts[1:num_classes + 1] > 0
    return labels


def labels_from_annotations(paths: Sequence[Path], class_names: Sequence[str]) -> np.ndarray:
    """N x K float32 from the <object><name> entries of VOC XML annotations."""
    index = {name: c for c, name in enumerate(class_names)}
    labels = np.zeros((len(paths), len(class_names)), dtype=np.float32)
    for row, path in enumerate(paths):
        for node in ET.parse(path).getroot().iter("object"):
            name = (node.findtext("name") or "").strip()
            if name not in index:
                raise ValueError(f"annotation {path} names class {name!r}, not one of "
                                 f"{list(class_names)}")
            labels[row, index[name]] = 1.0
    return labels


def _user_cache_dir(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return base / "more_fast" / digest


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def resolve_cache_dir(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir` if given, else `<root>/.more_fast_cache`, else (read-only root) a user dir."""
    if cache_dir is not None:
        path = Path(cache_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = root / CACHE_DIRNAME
    if _writable_dir(path):
        return path
    path = _user_cache_dir(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(sources: Sequence[Path], num_classes: int) -> str:
    sha = hashlib.sha1(f"{num_classes}\n".encode())
    for path in sources:
        stat = path.stat()
        sha.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return sha.hexdigest()[:16]


def cached_labels(cache_dir: Path, split: str, sources: Sequence[Path], num_classes: int,
                  compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Labels from `cache_dir` if its file matches `sources`, else `compute()` and store it."""
    tag = re.sub(r"[^\w.-]", "_", split)
    path = cache_dir / f"cls_labels_{tag}_{_digest(sources, num_classes)}.npy"
    if path.exists():
        labels = np.load(path)
        if labels.shape == (len(sources), num_classes):
            return labels.astype(np.float32)
    labels = compute().astype(np.float32)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as handle:
        np.save(handle, labels)
    os.replace(handle.name, path)
    return labels
