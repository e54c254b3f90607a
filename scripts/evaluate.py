#!/usr/bin/env python
"""Evaluate a MoRe checkpoint: mIoU of CAM, aux CAM, LAM and decoder (docs/METHOD.md, Evaluation).

    python scripts/evaluate.py --checkpoint runs/voc/checkpoints/ckpt_00020000.pt \\
        --data voc --data-root VOC2012 --split val --protocol published --crf

Protocols (details in more_fast/protocols.py):
  train-val   the validation of the training loop: crop x crop images and masks, the training
              CAM scales, ground-truth image labels, the recipe's background (VOC 0.5, COCO 0.45).
  published   docs/METHOD.md, Published protocols; scored at the original image size: input resized to crop x crop (448);
              CAM / aux CAM / LAM from multi-scale + flip maps, scales 1.0 0.5 0.75 1.25 1.5
              1.75 2.0, image labels from the classifier (sigmoid(logit) > 0.5; none predicted:
              the decoder's classes with >= 5 patches), background 0.5; decoder from scales 1.0
              1.25 1.5: logits of x plus flipped-back logits of flip(x), max over scales, argmax
              (--decoder-protocol mean_prob: the mean softmax of the 6 passes instead).
  both        the two, one after the other.
Both protocols also report the artifact ratio (more_fast/artifacts.py): the share of a present
class's class-patch attention, and of its LAM's positive mass, on patches of another class or
background; measured at crop x crop from one single-scale forward per image. Lower is better.
--crf adds dense-CRF rows (LAM and decoder, the published parameters, docs/METHOD.md, Published protocols) to the published protocol,
by default with the permutohedral-lattice CRF on the evaluation device (more_fast/lattice.py: no
extra package); --crf-backend pydensecrf runs the optional CPU package pydensecrf2 instead
(`pip install pydensecrf2`), a cross-check, spread over --crf-workers processes.
--save-png DIR writes the chosen prediction (--save-map; its CRF version with --crf) of every
image as a VOC palette PNG at the original size, DIR/<name>.png. For the VOC test server, put
them under results/VOC2012/Segmentation/comp6_test_cls/ and archive that folder.
"""
import argparse
import json
import pathlib
import sys
import time

import torch

from more_fast.cli import common_parser, kernel_backend, non_negative_int, positive_int

CROP_HELP = "default: the training crop, else 448"


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="evaluate.py", description=doc[0], parents=[common_parser(CROP_HELP)],
                                epilog="\n\n".join(doc[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint, a converted published one "
                   "(scripts/convert_checkpoint.py), or a published MoRe checkpoint")
    p.add_argument("--data", choices=("voc", "coco", "synthetic"), default="synthetic", help="data set (default: synthetic)")
    p.add_argument("--data-root", help="data folder in the VOC layout (default: the training run's with the same --data; synthetic: the cache "
                   "folder, default data_cache/synthetic, generated when missing)")
    p.add_argument("--split", default="val", help="split list name (VOC also test: no masks, PNGs only; default: val)")
    p.add_argument("--protocol", choices=("train-val", "published", "both"), default="published",
                   help="see below (default: published)")
    p.add_argument("--crf", action="store_true",
                   help="dense CRF on the published LAM and decoder (default: off)")
    p.add_argument("--crf-backend", choices=("auto", "lattice", "pydensecrf"), default="auto",
                   help="auto / lattice: the lattice CRF on the evaluation device; pydensecrf: the optional CPU package "
                   "pydensecrf2 (default: auto)")
    p.add_argument("--crf-workers", type=non_negative_int, default=0,
                   help="processes for --crf-backend pydensecrf (0: in this process; default: 0)")
    p.add_argument("--save-png", metavar="DIR", help="write the chosen prediction of every image as a VOC palette PNG (default: none)")
    p.add_argument("--save-map", choices=("lam", "decoder", "cam", "aux_cam"), default="lam",
                   help="the prediction --save-png writes (default lam: the published 76.4 protocol)")
    p.add_argument("--image-labels", choices=("classifier", "gt"), default="classifier",
                   help="published protocol: image labels of CAM/LAM from the classifier or the ground truth "
                   "(default: classifier)")
    p.add_argument("--decoder-protocol", choices=("published", "mean_prob"), default="published",
                   help="published protocol's decoder: max over scales of the flip-summed logits (published) "
                   "or the mean softmax probability of all passes (default: published)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward (default: 1)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (default: 2)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; default: off)")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="evaluate only the first N images (a quick look; default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (default: none)")
    return p


class SkipUnreadable(torch.utils.data.Dataset):
    """Published-protocol samples; one whose image or mask cannot be decoded, or whose sizes
    disagree, becomes {"bad": one-line reason naming the file}, reported and left out."""

    def __init__(self, samples, dataset):
        self.samples, self.dataset = samples, dataset

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        from more_fast.data.voc import BadSample

        try:
            sample = self.samples[index]
            if sample["mask"].shape == sample["image"].shape[1:]:
                return sample
        except (OSError, SyntaxError, ValueError):
            pass
        try:
            self.dataset.load(index)  # decodes again, to name the file and the reason
        except BadSample as err:
            return {"bad": str(err)}
        return self.samples[index]  # not a decoding problem: let it raise with its traceback


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_rows(title: str, results: dict) -> str:
    labels = {"cam": "CAM", "aux_cam": "aux CAM", "lam": "LAM", "decoder": "decoder", "lam_crf": "LAM + CRF",
              "decoder_crf": "decoder + CRF", "background": "all-background"}
    rows = [title, f"  {'map':<18}{'mIoU':>8}"]
    rows += [f"  {labels[k]:<18}{results[k]:>8.2f}" for k in labels if k in results]
    return "\n".join(rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    backend = kernel_backend(args)  # once, before any work
    if backend is None:
        return 2
    import kernels

    with kernels.use_backend(backend):
        return _main(args)


def _main(args) -> int:
    from more_fast.artifacts import ArtifactMeter, format_artifacts, measure_artifacts
    from more_fast.checkpoint import load_checkpoint
    from more_fast.data import save_label_png
    from more_fast.device import resolve_device
    from more_fast.protocols import OriginalSize, collate_list, evaluate_published
    from more_fast.training.config import RECIPES, TrainConfig
    from more_fast.training.data import build_dataset, eval_loader, resolve_data_root, skip_bad
    from more_fast.training.evaluate import evaluate

    try:
        device = resolve_device(args.device)
        model, meta = load_checkpoint(args.checkpoint, map_location=device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    k = model.num_classes
    trained = meta.get("config") or {}
    values = dict(RECIPES[args.data])
    if trained.get("data") == args.data:  # the training run's own settings (scales, background, ...)
        values.update({key: val for key, val in trained.items() if key not in ("out", "resume", "pretrained")})
    values.update(data=args.data, num_classes=k, batch_size=args.batch_size, workers=args.workers)
    if args.data_root:
        values["data_root"] = args.data_root
    crop = args.crop_size or trained.get("crop_size") or 448
    if crop % model.encoder.patch_size:  # the checkpoint's backbone decides
        print(f"error: --crop-size: expected a multiple of the patch size {model.encoder.patch_size} of "
              f"{model.config['backbone']}, got {crop}", file=sys.stderr)
        return 2
    values["crop_size"] = crop
    cfg = TrainConfig(**{key: val for key, val in values.items() if key in TrainConfig.__dataclass_fields__})
    try:
        root = resolve_data_root(cfg)
        dataset = build_dataset(cfg, root, args.split, False)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dataset.num_classes != k:
        print(f"error: the checkpoint has {k} classes, the {args.data} data set {dataset.num_classes}",
              file=sys.stderr)
        return 2

    def trim(data):  # --limit: the first N samples, whatever wraps the data set
        return torch.utils.data.Subset(data, range(min(args.limit, len(data)))) if args.limit else data
    amp = torch.bfloat16 if args.amp and device.type == "cuda" else None
    print(f"checkpoint {args.checkpoint}: {model.config['backbone']}, K = {k}"
          + (f", iteration {meta['iteration']}" if "iteration" in meta else "")
          + f" | {args.data} {args.split}: {len(trim(dataset))} images | device {device} | input {crop} x {crop}")
    report = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, "crop_size": crop}

    if args.protocol in ("train-val", "both"):
        t0 = time.perf_counter()
        meter = ArtifactMeter(k, device)
        with eval_loader(trim(dataset), cfg, device, report=warn) as loader:  # its workers end on a failure too
            results = evaluate(model, loader, k, device, cfg.cam_scales, cfg.eval_bkg, amp_dtype=amp, artifacts=meter)
        print(format_rows(f"train-val protocol (scales {tuple(cfg.cam_scales)}, ground-truth image labels, "
                          f"background {cfg.eval_bkg}, at {crop} x {crop}; {time.perf_counter() - t0:.0f} s)", results))
        report["train-val"] = results
        report["artifact"] = meter.result()
        print(format_artifacts(report["artifact"]))

    if args.protocol in ("published", "both"):
        save = None
        if args.save_png:
            folder = pathlib.Path(args.save_png)
            folder.mkdir(parents=True, exist_ok=True)

            def save(name, label):
                save_label_png(folder / f"{name}.png", label)
        loader = torch.utils.data.DataLoader(trim(SkipUnreadable(OriginalSize(dataset), dataset)), batch_size=args.batch_size,
                                             shuffle=False, num_workers=args.workers, collate_fn=collate_list)
        loader = skip_bad(loader, warn)  # a bad image: one line, and the rest evaluated
        executor = None
        if args.crf and args.crf_workers > 0 and args.crf_backend != "pydensecrf":
            warn(f"note: --crf-workers applies to --crf-backend pydensecrf; the lattice CRF runs on {device}")
        if args.crf and args.crf_workers > 0 and args.crf_backend == "pydensecrf":
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(args.crf_workers)
        t0 = time.perf_counter()
        try:
            results = evaluate_published(model, loader, device, crop, image_labels=args.image_labels, crf=args.crf,
                                         amp_dtype=amp, save=save, save_map=args.save_map, executor=executor,
                                         decoder_protocol=args.decoder_protocol, crf_backend=args.crf_backend)
        except RuntimeError as err:
            if "pydensecrf" in str(err):
                print(f"error: {err}", file=sys.stderr)
                return 2
            raise
        finally:
            if executor is not None:  # after a failure, the CRFs not started yet are not waited for
                executor.shutdown(cancel_futures=True)
        title = (f"published protocol (image labels: {args.image_labels}, {results['labelled_classes']:.2f} "
                 f"classes per image; at the original size; {time.perf_counter() - t0:.0f} s)")
        if results["has_ground_truth"]:
            print(format_rows(title, results))
        else:
            print(f"{title}: the {args.split} split has no ground-truth masks; no mIoU")
        if args.save_png:
            print(f"wrote {results['images']} PNGs ({args.save_map}{' + CRF' if args.crf and args.save_map in ('lam', 'decoder') else ''}) to {args.save_png}")
        report["published"] = results
        if "artifact" not in report and results["has_ground_truth"]:
            with eval_loader(trim(dataset), cfg, device) as loader:
                report["artifact"] = measure_artifacts(model, loader, k, device, amp)
            print(format_artifacts(report["artifact"]) + f" (at {crop} x {crop}, single scale)")

    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
