"""Command line of scripts/train.py: flags -> TrainConfig, validated before any work starts."""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from typing import Optional, Sequence

from .training.config import RECIPES, TrainConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _crop(text: str) -> int:
    value = _positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"expected a multiple of 16, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train MoRe. With no data flags: the built-in synthetic set and a small ViT.")
    p.add_argument("--data", choices=("synthetic", "voc", "coco"), default="synthetic",
                   help="data set; voc/coco select the published recipe (SPEC 6) as defaults")
    p.add_argument("--data-root", help="data folder in the VOC layout (synthetic: cache folder)")
    p.add_argument("--split-list", help="file listing the training images (overrides ImageSets/Segmentation/<split>.txt)")
    p.add_argument("--backbone", help="timm ViT name (default: vit_tiny_patch16_224; voc/coco: vit_base_patch16_224)")
    p.add_argument("--depth", type=_positive_int, help="number of ViT blocks (default: the named model's)")
    p.add_argument("--patch-size", type=_positive_int, help="ViT patch size (default: the named model's)")
    p.add_argument("--pretrained", help="local timm ViT checkpoint (.pth or .safetensors); nothing is downloaded")
    p.add_argument("--iters", type=_positive_int, help="iterations to run")
    p.add_argument("--schedule-iters", type=_positive_int,
                   help="length of the LR schedule and loss phases (default: max(--iters, the recipe's length))")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--crop-size", type=_crop)
    p.add_argument("--eval-every", type=_positive_int)
    p.add_argument("--log-every", type=_positive_int)
    p.add_argument("--out", help="output folder (default runs/<data>; with --resume and no --out: the resume folder)")
    p.add_argument("--resume", help="folder holding checkpoints to continue from (the newest readable one)")
    p.add_argument("--seed", type=int)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (on the CPU only where bf16 is native)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the losses")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics and panels to <out>/tensorboard (needs the tensorboard extra)")
    p.add_argument("--kernels", choices=("auto", "triton", "reference"), help="fused-op backend (default auto)")
    p.add_argument("--workers", type=_non_negative_int, help="DataLoader workers")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--num-classes", type=_positive_int, help="synthetic only: number of classes (1..6)")
    p.add_argument("--cam-scales", type=lambda t: tuple(float(v) for v in t.split(",")),
                   help="comma-separated scales of the multi-scale CAM (default: the recipe's)")
    p.add_argument("--eval-bkg", type=float, help="background score of the CAM/LAM label maps in evaluation")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"),
                   help="stop (default) or skip the step on a non-finite loss (skip syncs every step)")
    return p


_FLAG_TO_FIELD = {"batch_size": "batch_size", "crop_size": "crop_size", "eval_every": "eval_every",
                  "log_every": "log_every", "data_root": "data_root", "split_list": "split_list",
                  "schedule_iters": "schedule_iters", "patch_size": "patch_size", "cam_scales": "cam_scales", "num_classes": "num_classes", "eval_bkg": "eval_bkg",
                  "on_nonfinite": "on_nonfinite"}


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse flags into a TrainConfig: recipe defaults first, then the given flags; errors exit early."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = dict(RECIPES[args.data])
    values["data"] = args.data
    for name in ("backbone", "depth", "pretrained", "iters", "out", "resume", "seed", "kernels", "workers", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for flag, field in _FLAG_TO_FIELD.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    values["amp"] = args.amp
    values["compile"] = args.compile
    values["tensorboard"] = args.tensorboard
    if "out" not in values:
        values["out"] = args.resume if args.resume else f"runs/{args.data}"
    patch = args.patch_size or 16
    crop = args.crop_size if args.crop_size is not None else values.get("crop_size", TrainConfig.crop_size)
    if crop % patch:
        parser.error(f"--crop-size: expected a multiple of the patch size {patch}, got {crop}")
    if args.data != "synthetic" and args.num_classes is not None:
        parser.error("--num-classes: only for --data synthetic (voc has 20 classes, coco 80)")
    if args.data != "synthetic" and not args.data_root:
        parser.error(f"--data-root: required with --data {args.data}")
    if args.data_root and args.data != "synthetic" and not pathlib.Path(args.data_root).is_dir():
        parser.error(f"--data-root: no such folder {args.data_root}")
    if args.pretrained and not os.path.isfile(args.pretrained):
        parser.error(f"--pretrained: no such file {args.pretrained}")
    if args.split_list and not os.path.isfile(args.split_list):
        parser.error(f"--split-list: no such file {args.split_list}")
    if args.backbone:
        import timm

        if not timm.is_model(args.backbone):
            parser.error(f"--backbone: unknown timm model {args.backbone!r} (see timm.list_models('vit_*'))")
    if args.eval_bkg is not None and not 0.0 <= args.eval_bkg <= 1.0:
        parser.error(f"--eval-bkg: expected a number in [0, 1], got {args.eval_bkg}")
    if args.resume and not pathlib.Path(args.resume).is_dir():
        parser.error(f"--resume: no such folder {args.resume}")
    if args.device and args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"--device: expected auto, cpu or cuda[:N], got {args.device}")
    if args.data == "synthetic" and args.num_classes is not None and not 1 <= args.num_classes <= 6:
        parser.error(f"--num-classes: expected 1..6 for the synthetic set, got {args.num_classes}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})
