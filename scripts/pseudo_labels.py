#!/usr/bin/env python
"""Pseudo labels of a MoRe checkpoint for multi-stage training: one VOC palette PNG per image.

    python scripts/pseudo_labels.py --checkpoint more_voc.pt --data voc --data-root VOC2012 \\
        --split train_aug --out pseudo/ --crf

Each image of the split is labelled at its original size by the published map protocol
(more_fast/protocols.py): the multi-scale + flip LAM (--map lam, the default; --map cam: the
CAM) at scales 1.0 0.5 0.75 1.25 1.5 1.75 2.0 of the crop x crop input, resized to the image,
for the image's classes (--image-labels gt, the default: the split's image-level labels, the weak
supervision a training set has; classifier: the classifier's, as scripts/evaluate.py). Label =
argmax over [--bkg | maps of the classes]; with --crf, the dense CRF of [1 - max | maps]
(more_fast/crf.py, the published parameters; the lattice on the evaluation device by default).
Values: 0 background, c + 1 class c (an image without classes is all background); the palette's
255 (ignore) is VOC's, never written by this single-threshold protocol.

OUT/<name>.png is written atomically (a temporary file renamed over it), so an interrupted run
resumes where it stopped: images whose PNG exists are skipped (and still scored). No score files
are written. With ground-truth masks the pseudo-label mIoU of the whole split is printed at the
end (the table papers report for pseudo-label quality). An image that cannot be decoded is
reported in one line and the rest continue.
"""
import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from more_fast.cli import cam_scales, common_parser, kernel_backend, non_negative_int, positive_int

MAPS = ("lam", "cam")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="pseudo_labels.py", description=doc[0], parents=[common_parser("default: the training crop, else 448")],
                                epilog="\n\n".join(doc[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or a converted published one")
    p.add_argument("--data", choices=("voc", "coco", "synthetic"), default="voc", help="data set (default: voc)")
    p.add_argument("--data-root", help="data folder in the VOC layout (synthetic: the cache folder, generated when missing)")
    p.add_argument("--split", default="train_aug", help="split list name (default: train_aug)")
    p.add_argument("--out", required=True, help="output folder: OUT/<name>.png")
    p.add_argument("--map", choices=MAPS, default="lam", help="the map labelled (default: lam, the published protocol)")
    p.add_argument("--bkg", type=float, default=0.5, help="background score without --crf (default: 0.5, as published)")
    p.add_argument("--image-labels", choices=("gt", "classifier"), default="gt",
                   help="the image's classes: the split's image labels or the classifier's (default: gt)")
    p.add_argument("--scales", type=cam_scales, default="1.0,0.5,0.75,1.25,1.5,1.75,2.0", metavar="S,S,...",
                   help="CAM/LAM scales (default: the published 1.0,0.5,0.75,1.25,1.5,1.75,2.0)")
    p.add_argument("--crf", action="store_true", help="dense CRF on the map (the published parameters; default: off)")
    p.add_argument("--crf-backend", choices=("auto", "lattice", "pydensecrf"), default="auto",
                   help="auto / lattice: on the evaluation device; pydensecrf: the optional CPU package (default: auto)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; default: off)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (default: 2)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images of the split (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON (default: none)")
    return p


class Samples(torch.utils.data.Dataset):
    """OriginalSize samples of the images to label; one that cannot be decoded (or whose mask's size
    differs) becomes {"bad": one-line reason, "name": ...}."""

    def __init__(self, dataset, indices):
        from more_fast.protocols import OriginalSize

        self.dataset, self.original, self.indices = dataset, OriginalSize(dataset), list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        from more_fast.data.voc import BadSample

        index = self.indices[i]
        name = self.dataset.names[index]
        try:
            sample = self.original[index]
            if sample["mask"].shape == sample["image"].shape[1:]:
                return sample
            reason = f"mask {tuple(sample['mask'].shape)} and image {tuple(sample['image'].shape[1:])} differ in size"
        except (OSError, SyntaxError, ValueError) as err:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            try:
                self.dataset.load(index)
            except BadSample as bad:
                reason = str(bad)
            except Exception:  # noqa: BLE001 (the first reason stands)
                pass
        return {"bad": f"{name}: {reason}", "name": name}


def write_png_atomic(path: pathlib.Path, label: np.ndarray) -> None:
    """save_label_png to a temporary file in the same folder, then rename it over `path`."""
    from more_fast.data import save_label_png

    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        save_label_png(tmp, label)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    backend = kernel_backend(args)  # once, before any work
    if backend is None:
        return 2
    import kernels

    with kernels.use_backend(backend):
        return _main(args)


def _main(args) -> int:
    from more_fast import cam as C
    from more_fast.checkpoint import load_checkpoint
    from more_fast.crf import crf_available, crf_map_labels, INSTALL_HINT
    from more_fast.data.labels import read_mask
    from more_fast.device import resolve_device
    from more_fast.protocols import collate_list, image_labels_with_fallback, network_input, published_maps
    from more_fast.training.config import RECIPES, TrainConfig
    from more_fast.training.data import build_dataset, resolve_data_root
    from more_fast.training.evaluate import confusion, miou

    if not 0.0 <= args.bkg <= 1.0:
        print(f"error: --bkg: expected a score in [0, 1], got {args.bkg}", file=sys.stderr)
        return 2
    if args.crf and not crf_available(args.crf_backend):
        print(f"error: --crf-backend pydensecrf: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        model, meta = load_checkpoint(args.checkpoint, map_location=device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.eval()
    k = model.num_classes
    trained = meta.get("config") or {}
    values = dict(RECIPES[args.data])
    if trained.get("data") == args.data:
        values.update({key: val for key, val in trained.items() if key not in ("out", "resume", "pretrained")})
    values.update(data=args.data, num_classes=k, workers=args.workers)
    if args.data_root:
        values["data_root"] = args.data_root
    crop = args.crop_size or trained.get("crop_size") or 448
    if crop % model.encoder.patch_size:
        print(f"error: --crop-size: expected a multiple of the patch size {model.encoder.patch_size}, got {crop}",
              file=sys.stderr)
        return 2
    values["crop_size"] = crop
    cfg = TrainConfig(**{key: val for key, val in values.items() if key in TrainConfig.__dataclass_fields__})
    try:
        dataset = build_dataset(cfg, resolve_data_root(cfg), args.split, False)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dataset.num_classes != k:
        print(f"error: the checkpoint has {k} classes, the {args.data} data set {dataset.num_classes}", file=sys.stderr)
        return 2
    if args.image_labels == "gt" and not dataset.has_masks and not np.asarray(dataset.cls_labels).any():
        print(f"error: --image-labels gt: the {args.split} split has no image labels; use --image-labels classifier",
              file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = min(args.limit, len(dataset)) if args.limit else len(dataset)
    done = [i for i in range(total) if (out / f"{dataset.names[i]}.png").is_file()]
    todo = [i for i in range(total) if not (out / f"{dataset.names[i]}.png").is_file()]
    protocol = (f"{args.map.upper()} scales {tuple(args.scales)}, {args.image_labels} image labels, "
                + (f"CRF ({args.crf_backend})" if args.crf else f"background {args.bkg}"))
    print(f"checkpoint {args.checkpoint}: {model.config['backbone']}, K = {k} | {args.data} {args.split}: {total} images, "
          f"{len(done)} already in {out}, {len(todo)} to label | {protocol} | device {device} | input {crop} x {crop}",
          flush=True)
    amp = torch.bfloat16 if args.amp and device.type == "cuda" else None
    k1 = k + 1
    conf = torch.zeros(k1, k1, dtype=torch.int64)
    scored = 0
    loader = torch.utils.data.DataLoader(Samples(dataset, todo), batch_size=1, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate_list)
    t0, last, written, bad = time.perf_counter(), 0.0, 0, 0
    with torch.no_grad():
        for n, (sample,) in enumerate(loader, start=1):
            if "bad" in sample:
                print(f"skipped: {sample['bad']}", file=sys.stderr, flush=True)
                bad += 1
                continue
            x = network_input([sample["image"]], crop, device)
            maps = published_maps(model, x, args.scales, (1.0,), amp)
            if args.image_labels == "gt":
                labels = sample["cls_label"][None].to(device).float()
            else:
                labels = image_labels_with_fallback(maps["logits"], maps["seg_grid"])
            size = tuple(sample["image"].shape[1:])
            resized = F.interpolate(maps[args.map], size=size, mode="bilinear", align_corners=False)
            if args.crf:
                image = sample["image"].permute(1, 2, 0).contiguous()
                if args.crf_backend == "pydensecrf":
                    pred = crf_map_labels(image.numpy(), resized[0].cpu().numpy(), labels[0].cpu().numpy() > 0,
                                          backend="pydensecrf")
                else:
                    pred = crf_map_labels(image.to(device), resized[0], labels[0] > 0, backend=args.crf_backend).cpu().numpy()
            else:
                pred = C.map_prediction(resized, labels, args.bkg)[0].cpu().numpy().astype(np.uint8)
            write_png_atomic(out / f"{sample['name']}.png", pred)
            written += 1
            if dataset.has_masks:
                conf += confusion(torch.from_numpy(pred.astype(np.int64)), sample["mask"], k1)
                scored += 1
            now = time.perf_counter()
            if now - last >= 10.0 or n == len(todo):
                rate = n / max(now - t0, 1e-9)
                print(f"  {n}/{len(todo)} ({100.0 * n / max(len(todo), 1):.1f}%), {rate:.2f} images/s, "
                      f"ETA {_eta((len(todo) - n) / rate)}", flush=True)
                last = now
    if dataset.has_masks:  # the images labelled before: read back, scored with the rest
        for i in done:
            name = dataset.names[i]
            try:
                pred, mask = read_mask(out / f"{name}.png"), read_mask(dataset.mask_paths[i])
            except (OSError, SyntaxError, ValueError) as err:
                print(f"skipped (not scored): {name}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            if pred.shape != mask.shape:
                print(f"skipped (not scored): {name}: {out / (name + '.png')} is {pred.shape}, the mask {mask.shape}",
                      file=sys.stderr)
                continue
            conf += confusion(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)), k1)
            scored += 1
    summary = {"images": total, "written": written, "resumed": len(done), "skipped": bad, "protocol": protocol,
               "seconds": round(time.perf_counter() - t0, 1)}
    print(f"wrote {written} PNGs to {out} ({len(done)} there before, {bad} skipped) in {summary['seconds']:.0f} s")
    if scored:
        value, per_class = miou(conf)
        summary.update(miou=100.0 * value, scored=scored, per_class_iou=[100.0 * v for v in per_class])
        print(f"pseudo-label mIoU ({protocol}) over {scored} images of {args.split}: {100.0 * value:.2f}")
    else:
        print(f"the {args.split} split has no ground-truth masks: no mIoU")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if written + len(done) > 0 or total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
