#!/usr/bin/env python
"""Maps of a MoRe checkpoint for every image in a folder, as PNG panels.

    python scripts/infer.py --checkpoint more_voc.pt --images photos/ --out maps/

Each image is resized to crop x crop; its panel <out>/<name>.png shows, left to right:
image | CAM | LAM | class-patch attention | prediction. The image labels come from the
classifier (sigmoid(logit) > 0.5; with none above, the single most likely class). CAM and LAM
are multi-scale + flip maps (--scales), each the maximum over the labelled classes; the
class-patch attention is the last block's attention of the top labelled class's token over the
patches (mean of the heads' softmax, from the fused extraction); all overlaid on the image. The prediction is the decoder's (or, with
--prediction lam, the LAM's with background 0.5), in VOC colours. <out>/predictions.json lists
the labelled classes and their probabilities per image.
"""
import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from more_fast.cli import cam_scales, common_parser, kernel_backend

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="infer.py", description=doc[0], epilog="\n\n".join(doc[2:]),
                                parents=[common_parser("default: the training crop, else 448")],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or a converted published one")
    p.add_argument("--images", required=True, help="folder of images (jpg, png, ...)")
    p.add_argument("--out", required=True, help="output folder for the panels")
    p.add_argument("--scales", type=cam_scales, default="1.0,0.5,0.75,1.5", metavar="S,S,...",
                   help="CAM/LAM scales, comma separated (default: 1.0,0.5,0.75,1.5)")
    p.add_argument("--prediction", choices=("decoder", "lam"), default="decoder",
                   help="the last tile: the decoder's prediction or the LAM's (default: decoder)")
    p.add_argument("--class-names", choices=("auto", "voc", "coco", "synthetic", "index"), default="auto",
                   help="names in predictions.json (auto: by the number of classes; default: auto)")
    return p


def class_names(kind: str, k: int) -> list[str]:
    from more_fast.data import COCO_CLASSES, SYNTHETIC_CLASSES, VOC_CLASSES

    table = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "synthetic": SYNTHETIC_CLASSES}
    if kind == "auto":
        kind = {len(VOC_CLASSES): "voc", len(COCO_CLASSES): "coco"}.get(k, "synthetic" if k <= len(SYNTHETIC_CLASSES) else "index")
    names = table.get(kind)
    if names is None or len(names) < k:
        return [f"class_{c}" for c in range(k)]
    return list(names[:k])


def heat_overlay(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 image, H x W map in [0, 1] -> a blue-to-red heat map over the image."""
    m = np.clip(m, 0, 1)
    heat = np.stack([m, 1 - np.abs(2 * m - 1), 1 - m], axis=-1) * 255
    return (0.5 * heat + 0.5 * image).astype(np.uint8)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    backend = kernel_backend(args)  # once, before any work
    if backend is None:
        return 2
    import kernels

    with kernels.use_backend(backend):
        return _main(args)


def _main(args) -> int:
    from more_fast import cam
    from more_fast.checkpoint import load_checkpoint
    from more_fast.data import normalize, voc_palette
    from more_fast.device import resolve_device

    folder, out = pathlib.Path(args.images), pathlib.Path(args.out)
    if not folder.is_dir():
        print(f"error: --images: no such folder {folder}", file=sys.stderr)
        return 2
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        print(f"error: --images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        model, meta = load_checkpoint(args.checkpoint, map_location=device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    crop = args.crop_size or (meta.get("config") or {}).get("crop_size") or 448
    patch = model.encoder.patch_size
    if crop % patch:
        print(f"error: --crop-size: expected a multiple of the patch size {patch} of "
              f"{model.config['backbone']}, got {crop}", file=sys.stderr)
        return 2
    names = class_names(args.class_names, model.num_classes)
    palette = voc_palette()
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for path in paths:
        try:
            with Image.open(path) as pil:
                rgb = pil.convert("RGB").resize((crop, crop), Image.BILINEAR)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            print(f"skipped: image {path} cannot be decoded: {type(err).__name__}: {reason}", file=sys.stderr)
            continue
        image = np.array(rgb)  # crop x crop x 3
        x = normalize(torch.from_numpy(image).permute(2, 0, 1)[None], device)
        with torch.no_grad():
            o = model(x, attn_reduce="mean_softmax")
            prob = torch.sigmoid(o.logits[0].float())
            labels = (prob > 0.5).float()
            if labels.sum() == 0:
                labels[prob.argmax()] = 1.0
            reuse = model.cams(o) + (cam.lam_from_tokens(o.patch_tokens, o.class_tokens, o.grid),)
            maps = cam.multiscale_maps(model, x, args.scales, reuse=reuse, with_lam=True)
            cpa = o.class_patch_attn.float().reshape(1, model.num_classes, *o.grid)
            cpa = cam.minmax_normalize(F.interpolate(cpa, size=(crop, crop), mode="bilinear", align_corners=False))
            if args.prediction == "decoder":
                pred = cam.seg_prediction(o.seg, (crop, crop))[0]
            else:
                pred = cam.map_prediction(maps["lam"], labels[None], 0.5)[0]
        present = labels.bool()[:, None, None]

        def strongest(m):
            return (m[0].float() * present).amax(0).cpu().numpy()

        top = int(prob.masked_fill(labels == 0, -1.0).argmax())  # artifacts show per class: not mixed with others
        tiles = [image, heat_overlay(image, strongest(maps["cam"])), heat_overlay(image, strongest(maps["lam"])),
                 heat_overlay(image, cpa[0, top].float().cpu().numpy()), palette[pred.cpu().numpy().astype(np.int64)]]
        Image.fromarray(np.concatenate(tiles, axis=1).astype(np.uint8)).save(out / f"{path.stem}.png")
        report[path.stem] = {names[c]: round(float(prob[c]), 4) for c in torch.nonzero(labels).flatten().tolist()}
        print(f"{path.name}: {', '.join(report[path.stem]) or '-'}")
    (out / "predictions.json").write_text(json.dumps(report, indent=2))
    if not report:
        print(f"error: --images: none of the {len(paths)} images in {folder} could be decoded", file=sys.stderr)
        return 2
    print(f"wrote {len(report)} panels (image | CAM | LAM | class-patch attention of the top class | "
          f"{args.prediction}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
