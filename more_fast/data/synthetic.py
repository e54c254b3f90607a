"""A procedurally generated weakly supervised segmentation data set, in the VOC layout.

Why: the main job must train and report mIoU in minutes on a CPU with nothing downloaded, so
it needs data whose classes a tiny ViT can learn from image-level labels alone, with exact
masks to score the pseudo labels. Each class is one shape with its own texture and colour
pair (a striped red/yellow disk, a checkered blue/white square, ...), so texture + colour +
shape is a strong, consistent cue; objects are large (30-60% of the image side) and
there are 1-3 of them per image, each of a different class, later ones on top but hiding at
most half of any earlier one. Backgrounds are cluttered (smooth colour noise, lighting
gradients, pixel noise, plain half-saturated wobbly blobs) but never carry a class texture,
so an untrained model is far from solving the set (all-background scores about 12% mIoU).

The set is written once to a folder in the VOC layout (`JPEGImages/<name>.jpg`,
`SegmentationClassAug/<name>.png`, `ImageSets/Segmentation/{train,val}.txt`) so the VOC
loader serves it. Masks use 0 = background, c + 1 = class c, and 255 on a 1-pixel band along
the inner edge of every visible object region (as VOC marks its object outlines), so scores
skip the edge pixels that rasterization and JPEG blur leave ambiguous.
Every image is drawn from its own generator, seeded by (seed, split, index): the bytes
depend on the seed only, not on generation order.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from more_fast.data.palette import save_label_png

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "striped_disk",
    "checkered_square",
    "dotted_triangle",
    "sectored_ring",
    "gridded_cross",
    "speckled_star",
)

# Bump when the rendering changes, so that cached sets written by older code are regenerated.
_VERSION = 1
_META = "synthetic.json"
_LAYOUT_DIRS = ("JPEGImages", "SegmentationClassAug", "ImageSets")
# Object diameter as a fraction of the image side.
_OBJECT_SIZE = (0.3, 0.6)
# A new object may hide at most half of any earlier one, so every label stays visible.
_MIN_VISIBLE = 0.5
_PLACEMENT_TRIES = 20
# Object centres lie this many radii from the border: objects may be cut off a little.
_IN_FRAME = 0.75

Frame = tuple[np.ndarray, np.ndarray]  # (u, v): pixel coordinates in an object's own frame


def _disk(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.75


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.6
    return inside


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.4**2)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.36) & (av <= 1.0)) | ((av <= 0.36) & (au <= 1.0))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    turns = (np.arctan2(v, u) / (2 * np.pi) * 5) % 1.0
    point = 2.0 * np.abs(turns - 0.5)  # 1 at the five points, 0 halfway between them
    return np.sqrt(u * u + v * v) <= 0.55 + 0.5 * point


def _stripes(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sin(np.pi * u / 0.2) > 0


def _checkers(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (np.floor(u / 0.32) + np.floor(v / 0.32)) % 2 == 1


def _dots(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (u % 0.34 - 0.17) ** 2 + (v % 0.34 - 0.17) ** 2 < 0.1**2


def _sectors(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sin(8 * np.arctan2(v, u)) > 0


def _grid_lines(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (np.abs(u % 0.3 - 0.15) < 0.05) | (np.abs(v % 0.3 - 0.15) < 0.05)


def _speckle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.random(u.shape) < 0.3


Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]
Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]

# Per class: (shape, texture, colour where the texture is off, colour where it is on).
_CLASS_STYLES: tuple[tuple[Shape, Texture, tuple[int, int, int], tuple[int, int, int]], ...] = (
    (_disk, _stripes, (210, 40, 40), (245, 215, 60)),
    (_square, _checkers, (40, 70, 200), (230, 230, 230)),
    (_triangle, _dots, (40, 160, 60), (20, 20, 20)),
    (_ring, _sectors, (240, 140, 20), (90, 50, 20)),
    (_cross, _grid_lines, (40, 200, 210), (20, 30, 100)),
    (_star, _speckle, (200, 40, 190), (240, 240, 240)),
)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly upsampled random lattice in [-1, 1]: size x size x channels."""
    lattice = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1, channels))
    t = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(np.floor(t).astype(np.int64), cells - 1)
    f = t - i0
    rows = lattice[i0] * (1 - f)[:, None, None] + lattice[i0 + 1] * f[:, None, None]
    return rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]


def _object_frame(x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float,
                  angle: float) -> Frame:
    dx, dy = (x - cx) / radius, (y - cy) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Muted smooth colour noise plus 1-3 plain, half-saturated wobbly blobs (no texture)."""
    size = x.shape[0]
    tint = rng.uniform(70, 180) + rng.normal(0, 20, 3)
    image = tint + rng.uniform(20, 50) * _smooth_noise(rng, size, int(rng.integers(2, 6)), 3)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.08, 0.2) * size
        u, v = _object_frame(x, y, *rng.uniform(0, size, 2), radius, rng.uniform(0, 2 * np.pi))
        u = u * rng.uniform(0.6, 1.4)
        phase = rng.uniform(0, 2 * np.pi, 2)
        phi = np.arctan2(v, u)
        wobble = 1 + 0.2 * np.sin(2 * phi + phase[0]) + 0.15 * np.sin(3 * phi + phase[1])
        blob = np.sqrt(u * u + v * v) <= wobble
        grey = rng.uniform(60, 200)  # half-saturated: class colours stay the most vivid
        colour = (grey + rng.uniform(0, 255, 3)) / 2 + 15 * _smooth_noise(rng, size, 3, 3)
        image = np.where(blob[..., None], colour, image)
    return image


def render_sample(rng: np.random.Generator, image_size: int,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H x W x 3 uint8) and its label map (H x W uint8, VOC convention)."""
    centres = np.arange(image_size) + 0.5
    x, y = np.meshgrid(centres, centres, indexing="xy")
    image = _background(rng, x, y)
    owner = np.full((image_size, image_size), -1, dtype=np.int64)
    full_areas: list[int] = []
    labels: list[int] = []
    count = int(rng.integers(1, min(3, num_classes) + 1))
    for cls in rng.choice(num_classes, size=count, replace=False):
        shape_fn, texture_fn, off, on = _CLASS_STYLES[cls]
        for _ in range(_PLACEMENT_TRIES):
            radius = rng.uniform(*_OBJECT_SIZE) * image_size / 2
            margin = _IN_FRAME * radius
            cx, cy = rng.uniform(margin, image_size - margin, 2)
            u, v = _object_frame(x, y, cx, cy, radius, rng.uniform(0, 2 * np.pi))
            shape = shape_fn(u, v)
            visible = np.bincount(owner[owner >= 0], minlength=len(full_areas))
            hidden = np.bincount(owner[shape & (owner >= 0)], minlength=len(full_areas))
            if shape.any() and np.all(visible - hidden >= _MIN_VISIBLE * np.array(full_areas)):
                break
        else:
            continue  # no room for this object: the image keeps the ones already placed
        brightness = rng.uniform(0.8, 1.15)
        colours = np.clip(np.array([off, on]) * brightness + rng.normal(0, 12, (2, 3)), 0, 255)
        pattern = texture_fn(u, v, rng)
        image[shape] = colours[pattern[shape].astype(np.int64)]
        owner[shape] = len(full_areas)
        full_areas.append(int(shape.sum()))
        labels.append(int(cls) + 1)
    light_angle = rng.uniform(0, 2 * np.pi)
    ramp = ((x - image_size / 2) * np.cos(light_angle)
            + (y - image_size / 2) * np.sin(light_angle)) / image_size  # within +-0.71
    image = image * (1 + rng.uniform(-0.3, 0.3) * ramp)[..., None] + rng.normal(0, 6, image.shape)
    label = np.array(labels + [0], dtype=np.uint8)[owner]  # owner -1 (background) picks the 0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), _mark_edges(label)


def _mark_edges(label: np.ndarray) -> np.ndarray:
    """Set 255 on object pixels with a 4-neighbour of another label (a 1-pixel inner band)."""
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
            | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return np.where(edge & (label > 0), np.uint8(255), label)


def _prepare_folder(root: Path) -> None:
    """Clear an earlier (possibly interrupted) synthetic set; never touch foreign data."""
    meta = root / _META
    if meta.exists():
        meta.unlink()
    elif any((root / name).exists() for name in _LAYOUT_DIRS):
        raise FileExistsError(
            f"{root} holds a VOC-style data set that make_synthetic_voc did not write "
            f"(no {_META}); refusing to overwrite it")
    for name in _LAYOUT_DIRS:
        shutil.rmtree(root / name, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    """The recorded parameters, or None when absent or unreadable (then we regenerate)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def make_synthetic_voc(root: str | os.PathLike, num_train: int = 1000, num_val: int = 200,
                       image_size: int = 96, num_classes: int = len(SYNTHETIC_CLASSES),
                       seed: int = 0) -> Path:
    """Write the synthetic set to `root` in the VOC layout, unless it is already there.

    `root/synthetic.json` records the parameters with `complete: false` before anything is
    written and `complete: true` after the last file, so an interrupted generation is
    regenerated on the next call; matching parameters make the call a no-op. Returns `root`.
    Not safe for concurrent callers on one folder: generate on one process (rank 0) first.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must lie in 1..{len(SYNTHETIC_CLASSES)}, got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be positive, got {num_train}, {num_val}")
    root = Path(root)
    params = {"version": _VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "num_classes": num_classes, "seed": seed,
              "classes": list(SYNTHETIC_CLASSES[:num_classes])}
    meta = root / _META
    if _read_json(meta) == {**params, "complete": True}:
        return root
    root.mkdir(parents=True, exist_ok=True)
    _prepare_folder(root)
    _write_json(meta, {**params, "complete": False})
    for directory in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        names = [f"{split}_{index:05d}" for index in range(count)]
        for index, name in enumerate(names):
            rng = np.random.default_rng([seed, split_id, index])
            image, label = render_sample(rng, image_size, num_classes)
            # 4:4:4 chroma: 3-pixel colour stripes would blur away under 4:2:0 subsampling.
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95,
                                        subsampling=0)
            save_label_png(root / "SegmentationClassAug" / f"{name}.png", label)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    _write_json(meta, {**params, "complete": True})
    return root
