#!/usr/bin/env python
"""Train MoRe: `python scripts/train.py --amp --compile` (synthetic data, small ViT, minutes on a CPU).

Real data: `--data voc --data-root VOC2012 --pretrained vit_base.pth` (the published recipe).
Several GPUs: `torchrun --nproc_per_node N scripts/train.py ...`.
SIGTERM / SIGINT / SIGUSR1 save a checkpoint of the step in flight and stop (see --help).
"""
import os
import shlex
import sys

import torch
import torch.distributed as dist

from more_fast.cli import config_from_args
from more_fast.training import NonFiniteLoss, Trainer
from more_fast.training.loop import BadSampleStop, TrainingStopped


def resume_command(argv, out, world: int) -> str:
    """This run's command line with --resume OUT in place of any --resume it had."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            args.append(arg)
    if world > 1:
        return f"the same torchrun command with --resume {shlex.quote(str(out))}"
    return shlex.join(["python", sys.argv[0] or "scripts/train.py", *args, "--resume", str(out)])


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
        try:
            trainer = Trainer(cfg, rank=rank, world=world, log=lambda msg: print(msg, flush=True))
        except (FileNotFoundError, ValueError) as err:  # bad data or weights found while setting up
            print(f"error: {err}", file=sys.stderr)
            return 2
        trainer.run()  # any other failure keeps its traceback
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except BadSampleStop as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        if rank == 0:
            argv = sys.argv[1:] if argv is None else list(argv)
            print(f"{stop}; resume: {resume_command(argv, stop.out, world)}", file=sys.stderr, flush=True)
        return stop.exit_code
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
