"""Command line of scripts/train.py: flags -> TrainConfig, validated before any work starts."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import pathlib
import sys
import typing
from typing import Optional, Sequence

from .training.config import RECIPES, TrainConfig


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def unit_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def crop_size(text: str) -> int:
    try:
        return positive_int(text)  # a multiple of the patch size: checked once the backbone is known
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (a multiple of the patch size), got {text}")


def cam_scales(text: str) -> tuple:
    """"1.0,0.5" -> (1.0, 0.5): the scales of the multi-scale CAM, each > 0."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text or 'nothing'}")
    return values


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N, checked against the GPUs of this machine."""
    name = text.strip().lower()
    if name != "auto":  # auto always resolves (to the CPU where there is no GPU); --help needs no torch
        from .device import device_problem

        device, problem = device_problem(name)
        if device is None:
            raise argparse.ArgumentTypeError(problem)
    return name


KERNEL_CHOICES = ("auto", "triton", "reference")
KERNELS_ENV = "MORE_FAST_KERNELS"  # the default of --kernels where it is set; nothing else reads it


def kernel_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in KERNEL_CHOICES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(KERNEL_CHOICES)}, got {text!r}"
            + (f" (the default comes from {KERNELS_ENV}={os.environ[KERNELS_ENV]!r})" if KERNELS_ENV in os.environ else ""))
    return mode


def kernel_backend(args) -> Optional[str]:
    """The backend that `args.kernels` runs on `args.device`: "triton" or "reference", chosen once
    for the run and printed to stderr; None (after an `error:` line) where it cannot run there.

    evaluate.py, infer.py and pseudo_labels.py enter `kernels.use_backend(answer)` around their
    work; train.py's Trainer holds its own (TrainStep.backend)."""
    import kernels  # here, not at the top: --help stays fast
    from .device import resolve_device

    try:
        backend = kernels.choose_backend(args.kernels, resolve_device(args.device))
    except ValueError as err:  # both name their argument
        print(f"error: {err}", file=sys.stderr)
        return None
    print(f"kernels {backend}" + (f" (--kernels {args.kernels})" if backend != args.kernels else ""), file=sys.stderr)
    return backend


def common_parser(crop_help: str) -> argparse.ArgumentParser:
    """--device, --kernels and --crop-size, declared once for train.py, evaluate.py and infer.py."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N (auto and cuda: cuda:LOCAL_RANK under torchrun; "
                        "auto: the CPU where there is no GPU; default: auto)")
    p.add_argument("--kernels", type=kernel_mode, metavar="{" + ",".join(KERNEL_CHOICES) + "}",
                   default=os.environ.get(KERNELS_ENV, "auto"),  # a str default goes through `type` too
                   help=f"fused-op backend (auto: triton where it runs, else the PyTorch reference; "
                        f"default: env {KERNELS_ENV}, else auto)")
    p.add_argument("--crop-size", type=crop_size, metavar="N", help=f"network input size, a multiple of the "
                   f"backbone's patch size ({crop_help})")
    return p


def _show(field: str, value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value is None:
        return {"depth": "the named model's", "patch_size": "the named model's", "pretrained": "none",
                "keep_checkpoints": "keep all"}.get(field, "none")
    return str(value)


def recipe_default(field: str) -> str:
    """"default: X" or, where the recipes differ, "default: X (synthetic), Y (voc), Z (coco)"."""
    shown = {data: _show(field, RECIPES[data].get(field, getattr(TrainConfig, field))) for data in RECIPES}
    if len(set(shown.values())) == 1:
        return f"default: {shown['synthetic']}"
    return "default: " + ", ".join(f"{value} ({data})" for data, value in shown.items())


def build_parser() -> argparse.ArgumentParser:
    d = recipe_default
    p = argparse.ArgumentParser(
        prog="train.py", description="Train MoRe. With no data flags: the built-in synthetic set and a small ViT.",
        parents=[common_parser(d("crop_size"))])
    p.add_argument("--data", choices=tuple(RECIPES), default="synthetic",
                   help="data set; voc/coco select the published recipe as defaults (default: synthetic)")
    p.add_argument("--data-root", help="data folder in the VOC layout (synthetic: cache folder, "
                   "default data_cache/synthetic; voc/coco: required)")
    p.add_argument("--split-list", help="file listing the training images "
                   "(default: ImageSets/Segmentation/<split>.txt of --data-root)")
    p.add_argument("--backbone", help=f"timm ViT name ({d('backbone')})")
    p.add_argument("--depth", type=positive_int, help=f"number of ViT blocks ({d('depth')})")
    p.add_argument("--patch-size", type=positive_int, help=f"ViT patch size ({d('patch_size')})")
    p.add_argument("--pretrained", help="backbone weights: a local timm ViT file (.pth or .safetensors) or "
                   "timm:<tag>, fetched by timm; none: random initialization (voc/coco default: "
                   "timm:vit_base_patch16_224.orig_in21k_ft_in1k, the published jx_vit_base_p16_224-80ecf9dd.pth; "
                   "synthetic: none)")
    p.add_argument("--iters", type=positive_int, help=f"iterations to run ({d('iters')})")
    p.add_argument("--schedule-iters", type=positive_int,
                   help="length of the LR schedule and loss phases (default: max(--iters, the recipe's length))")
    p.add_argument("--batch-size", type=positive_int, help=f"images per step and process ({d('batch_size')})")
    p.add_argument("--eval-every", type=positive_int, help=f"validate every N iterations ({d('eval_every')})")
    p.add_argument("--log-every", type=positive_int, help=f"log every N iterations ({d('log_every')})")
    p.add_argument("--out", help="output folder (default runs/<data>; with --resume and no --out: the resume folder)")
    p.add_argument("--resume", help="folder holding checkpoints to continue from (the newest readable one; default: a fresh run)")
    p.add_argument("--seed", type=integer, help=f"random seed ({d('seed')})")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (on the CPU only where bf16 is native; default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the losses (default: off)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics and panels to <out>/tensorboard (needs the tensorboard extra; default: off)")
    p.add_argument("--workers", type=non_negative_int, help=f"DataLoader workers ({d('workers')})")
    p.add_argument("--num-classes", type=positive_int,
                   help=f"synthetic only: number of classes, 1..6 ({d('num_classes').split(' (')[0]})")
    p.add_argument("--cam-scales", type=cam_scales, metavar="S,S,...",
                   help=f"comma-separated scales of the multi-scale CAM ({d('cam_scales')})")
    p.add_argument("--eval-bkg", type=unit_number,
                   help=f"background score of the CAM/LAM label maps in evaluation ({d('eval_bkg')})")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"),
                   help="stop or skip the step on a non-finite loss (skip syncs every step; default: stop)")
    p.add_argument("--save-every", type=positive_int, metavar="N",
                   help="write a checkpoint every N iterations, besides those at each evaluation and at the end "
                        f"({d('save_every')})")
    p.add_argument("--keep-checkpoints", type=positive_int, metavar="K",
                   help="after each save delete all checkpoints but the newest K and the best by validation "
                        "LAM mIoU (default: keep all)")
    p.add_argument("--on-bad-sample", choices=("stop", "skip"),
                   help="a training image or mask that cannot be read: stop (checkpoint, one line, exit 2) "
                        "or skip (replace it by another of the split; listed in metrics.jsonl) (default: stop)")
    p.add_argument("--no-gcr", dest="gcr", action="store_false", default=None,
                   help="class tokens go to the losses and the LAM without the GCR module (the ablation baseline; "
                        "default: with GCR)")
    p.add_argument("--set", dest="set_fields", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any TrainConfig field (repeatable, applied last), e.g. --set w_cre=0 --set gcr=off; "
                        "bools take on/off, Optional fields none, tuples comma-separated numbers (default: none)")
    p.epilog = STOP_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


STOP_EPILOG = """\
stopping and resuming:
  SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 lets the step in flight finish, writes a checkpoint of it
  (atomically: a second signal cannot leave a partial file), prints where it is and how to resume,
  and exits with 143 (SIGTERM), 130 (SIGINT) or 0 (SIGUSR1). Under torchrun every rank stops at
  the same iteration (checked every 10 iterations). Resume with the same flags plus --resume OUT;
  the resumed run ends exactly where an uninterrupted one would.
exit status: 0 done (or stopped by SIGUSR1), 1 any other failure (its traceback, then the newest
  checkpoint and the resume command), 2 bad flag, setup error or unreadable training sample (after a
  checkpoint of the last finished iteration), 3 non-finite loss, 130 SIGINT, 143 SIGTERM."""


def _set_error(message: str) -> None:
    """One line on stderr and exit 2, as argparse's own errors exit."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _in(*choices):
    return lambda v: v in choices, f"one of {', '.join(choices)}"


# the ranges of the named flags, and of the fields that have none; the parsed value must pass
_FIELD_CHECKS = {
    **{name: (lambda v: v > 0, "a positive integer") for name in (
        "iters", "schedule_iters", "recipe_iters", "reference_iters", "batch_size", "eval_every", "log_every",
        "depth", "patch_size", "num_classes", "decoder_dim", "synthetic_train", "synthetic_val")},
    **{name: (lambda v: v >= 0, "an integer >= 0") for name in (
        "workers", "num_registers", "warmup_iters", "seg_start", "label_switch", "ptc_start", "lir_start",
        "num_panels")},
    **{name: (lambda v: v >= 0, "a number >= 0") for name in ("w_cre", "w_ure", "w_ptc", "w_seg", "w_reg",
                                                             "weight_decay")},
    **{name: (lambda v: v > 0, "a number > 0") for name in ("backbone_lr", "head_lr", "poly_power",
                                                           "cre_temperature")},
    "crop_size": (lambda v: v > 0, "a positive integer"),  # the patch-size multiple is checked below
    "topk_ratio": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "reg_scale": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "eval_bkg": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "cam_scales": (lambda v: len(v) > 0 and all(x > 0 for x in v), "comma-separated numbers > 0"),
    "gcr_score": _in("published", "dot"),
    "attn_impl": _in("sdpa", "explicit"),
    "kernels": _in("auto", "triton", "reference"),
    "par_affinity": _in("fp32", "bf16"),
    "on_nonfinite": _in("stop", "skip"),
}
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def _parse_value(name: str, kind, text: str):
    """`text` as the field's type: bool, int, float, str, Optional[...], tuple of floats."""
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if text.lower() == "none":
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is tuple or typing.get_origin(kind) is tuple:
            return tuple(float(v) for v in text.split(","))
        return text
    except ValueError:
        expected = {bool: "on or off", int: "an integer", float: "a number"}.get(kind, "comma-separated numbers")
        _set_error(f"--set {name}={text}: expected {expected}")


def parse_set(items: Sequence[str]) -> dict:
    """--set FIELD=VALUE items -> {field: typed value}, the last of a repeated field winning.

    Exits 2 with one line on an unknown field (naming the closest fields) or a value of the wrong
    type or range."""
    fields = typing.get_type_hints(TrainConfig)
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            _set_error(f"--set {item}: expected FIELD=VALUE")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else f"; fields: {', '.join(fields)}"
            _set_error(f"--set {name}: unknown TrainConfig field{hint}")
        if name == "data":
            _set_error("--set data: use --data (it selects the recipe the other fields start from)")
        value = _parse_value(name, fields[name], text.strip())
        check = _FIELD_CHECKS.get(name)
        if value is not None and check is not None and not check[0](value):
            _set_error(f"--set {name}={text}: expected {check[1]}")
        values[name] = value
    return values


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse flags into a TrainConfig: recipe defaults first, then the given flags; errors exit early."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = parse_set(args.set_fields)
    for name, value in overrides.items():  # so the checks of the named flags below see --set values too
        if hasattr(args, name) and value is not None:
            setattr(args, name, value)
    values = dict(RECIPES[args.data])
    values["data"] = args.data
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in vars(args).items():  # each flag's dest is its TrainConfig field; None: not given
        if name in known and value is not None:
            values[name] = value
    values.update(overrides)
    if "out" not in values:
        values["out"] = args.resume if args.resume else f"runs/{args.data}"
    patch = values.get("patch_size", TrainConfig.patch_size)  # --patch-size, else the recipe's
    if patch is None:  # the named model's own: 14 for DINOv2 and EVA-02, 16 for most
        import timm

        from .model.backbone import timm_patch_size

        backbone = values.get("backbone", TrainConfig.backbone)
        try:
            patch = timm_patch_size(backbone) if timm.is_model(backbone) else None  # unknown: reported below
        except ValueError as err:
            parser.error(f"--backbone: {err}")
    crop = args.crop_size if args.crop_size is not None else values.get("crop_size", TrainConfig.crop_size)
    if patch and crop % patch:
        parser.error(f"--crop-size: expected a multiple of the patch size {patch}, got {crop}")
    if args.data != "synthetic" and args.num_classes is not None:
        parser.error("--num-classes: only for --data synthetic (voc has 20 classes, coco 80)")
    if args.data != "synthetic" and not args.data_root:
        parser.error(f"--data-root: required with --data {args.data}")
    if args.data_root and args.data != "synthetic" and not pathlib.Path(args.data_root).is_dir():
        parser.error(f"--data-root: no such folder {args.data_root}")
    if args.resume and args.pretrained is None:  # the checkpoint holds every weight: no fetch of the recipe's
        values.pop("pretrained", None)
    if (args.pretrained or "").lower() == "none":  # from scratch, also under a recipe that names weights
        values.pop("pretrained", None)
    recipe_weights = values.get("pretrained") if args.pretrained is None else None
    if recipe_weights and recipe_weights.startswith("timm:"):  # the recipe's tag names an architecture
        arch = recipe_weights.removeprefix("timm:").split(".")[0]
        backbone = values.get("backbone", TrainConfig.backbone)
        if backbone != arch:
            parser.error(f"--backbone: the {args.data} recipe's weights ({recipe_weights}) are for {arch}, not "
                         f"{backbone}: pass --pretrained FILE or timm:TAG with weights of {backbone}, or "
                         f"--pretrained none to train it from scratch")
    if values.get("pretrained"):  # a missing file, an unknown tag or no network: stop before any work
        from .model.pretrained import check_pretrained

        try:
            check_pretrained(values["pretrained"])
        except ValueError as err:
            parser.error(f"--pretrained: {str(err).removeprefix('pretrained: ')}")
    if args.split_list and not os.path.isfile(args.split_list):
        parser.error(f"--split-list: no such file {args.split_list}")
    if args.backbone:
        import timm

        if not timm.is_model(args.backbone):
            parser.error(f"--backbone: unknown timm model {args.backbone!r} (see timm.list_models('vit_*'))")
    if args.resume and not pathlib.Path(args.resume).is_dir():
        parser.error(f"--resume: no such folder {args.resume}")
    if values.get("device", "auto") != "auto":  # --set device=... too; the flag's own type checked it already
        from .device import device_problem

        if device_problem(values["device"])[0] is None:
            parser.error(f"--device: {device_problem(values['device'])[1]}")
    if args.data == "synthetic" and args.num_classes is not None and not 1 <= args.num_classes <= 6:
        parser.error(f"--num-classes: expected 1..6 for the synthetic set, got {args.num_classes}")
    return TrainConfig(**{k: v for k, v in values.items() if k in known})
