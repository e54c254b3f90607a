#!/usr/bin/env python
"""Train MoRe: `python scripts/train.py --amp --compile` (synthetic data, small ViT, minutes on a CPU).

Real data: `--data voc --data-root VOC2012 --pretrained vit_base.pth` (the published recipe).
Several GPUs: `torchrun --nproc_per_node N scripts/train.py ...`.
"""
import os
import sys

import torch
import torch.distributed as dist

from more_fast.cli import config_from_args
from more_fast.training import NonFiniteLoss, Trainer


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    try:
        Trainer(cfg, rank=rank, world=world, log=lambda msg: print(msg, flush=True)).run()
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as err:  # bad data or weights found while setting up
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
