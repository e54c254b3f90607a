#!/usr/bin/env python
"""Convert a published MoRe checkpoint (README, Real data) into a more_fast checkpoint.

    python scripts/convert_checkpoint.py --from-more model_iter_sota.pth --out more_voc.pt

The output holds {"model": state dict, "model_config": MoReNet args}; load it with
`more_fast.load_model(path)`, `scripts/evaluate.py --checkpoint` or `scripts/infer.py --checkpoint`.
K, R, the width, the depth and the pretrained grid are read from the tensors; the timm backbone
follows from (width, depth) for a plain ViT, or is named with --backbone (DINOv2, DeiT-III, EVA-02,
BEiT, CLIP, SigLIP: the heads are stored in no tensor). Unused published tensors (graph_layer._fc1.*, encoder.head.*) are
dropped and listed; any other unknown tensor is an error unless --ignore-unknown.
"""
import argparse
import sys

from more_fast.convert import convert_file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--from-more", required=True, metavar="SRC",
                   help="published MoRe checkpoint (.pth; a top-level 'model'/'state_dict' and 'module.' are handled)")
    p.add_argument("--out", required=True, metavar="DST", help="output file (written atomically)")
    p.add_argument("--backbone", metavar="NAME",
                   help="timm name of the encoder (default: the file's model_config, else the plain ViT of "
                        "the checkpoint's width and depth)")
    p.add_argument("--ignore-unknown", action="store_true",
                   help="drop (and list) tensors that MoReNet has no place for instead of failing (default: off)")
    args = p.parse_args(argv)
    try:
        report = convert_file(args.from_more, args.out, ignore_unknown=args.ignore_unknown, backbone=args.backbone)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {args.from_more}: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
