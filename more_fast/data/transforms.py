"""Joint image/mask transforms (docs/METHOD.md, VOC recipe) and ImageNet normalization.

The loaders return uint8 images: normalization runs on the device in the training loop
(`normalize`), so the host ships a quarter of the bytes and spends no CPU time on float math.
Geometric transforms run on `tv_tensors.Image` and `tv_tensors.Mask` together, so the mask
stays aligned with the image; torchvision always resizes masks with nearest neighbour, and
its colour transforms pass masks through untouched.
"""

from __future__ import annotations

import numbers

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PATCH_SIZE = 16


def check_crop_size(crop_size: int) -> None:
    """The ViT cuts 16-pixel patches, so a crop must be a positive multiple of 16."""
    integer = isinstance(crop_size, numbers.Integral) and not isinstance(crop_size, bool)
    if not integer or crop_size <= 0 or crop_size % PATCH_SIZE:
        raise ValueError(
            f"crop_size must be a positive multiple of {PATCH_SIZE}, got {crop_size!r}")


def train_transform(crop_size: int) -> v2.Transform:
    """Random resized crop (scale 0.32-1, bicubic), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.5
    (the published transform)."""
    check_crop_size(crop_size)
    return v2.Compose([
        v2.RandomResizedCrop(int(crop_size), scale=(0.32, 1.0), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.5),
    ])


def eval_transform(crop_size: int) -> v2.Transform:
    """Evaluation at crop_size x crop_size, as the published validation at 448 x 448."""
    check_crop_size(crop_size)
    return v2.Resize((int(crop_size), int(crop_size)), interpolation=InterpolationMode.BILINEAR,
                     antialias=True)


def apply_joint(transform: v2.Transform, image: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `transform` on a 3 x H x W uint8 image and its H x W mask; plain tensors out."""
    image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(x / 255 - mean) / std in float32, for (B x) 3 x H x W images in 0..255 (uint8 or float).

    With `device`, the (uint8) images move there first, so the cast runs on the device.
    """
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be (B x) 3 x H x W, got shape {tuple(images.shape)}")
    if device is not None:
        images = images.to(device, non_blocking=True)
    mean, std = _stats(images.device)
    return (images.float() / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`: float32 images in 0..255 (not clamped, not rounded)."""
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be (B x) 3 x H x W, got shape {tuple(images.shape)}")
    mean, std = _stats(images.device)
    return (images.float() * std + mean) * 255.0
