#!/usr/bin/env python
"""Train MoRe: `python scripts/train.py --amp --compile` (synthetic data, small ViT, minutes on a CPU).

Real data: `--data voc --data-root VOC2012 --pretrained vit_base.pth` (the published recipe).
Several GPUs: `torchrun --nproc_per_node N scripts/train.py ...`.
SIGTERM / SIGINT / SIGUSR1 save a checkpoint of the step in flight and stop (see --help).
"""
import os
import pathlib
import shlex
import sys
import traceback

import torch
import torch.distributed as dist

from more_fast.cli import config_from_args
from more_fast.training import NonFiniteLoss, Trainer
from more_fast.training import state
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


def failure_message(cfg, argv, rank: int, world: int) -> str:
    """The last line of a failed run: where its newest checkpoint is and how to go on from it."""
    who = f"rank {rank}: " if world > 1 else ""
    for folder in dict.fromkeys(f for f in (cfg.out, cfg.resume) if f):  # this run's, else the one it resumed
        found = state.list_checkpoints(pathlib.Path(folder)) if pathlib.Path(folder).is_dir() else []
        if found:
            return (f"error: {who}the run failed (traceback above); the newest checkpoint is {found[0]}; "
                    f"resume: {resume_command(argv, folder, world)}")
    again = "the same torchrun command" if world > 1 else shlex.join(["python", sys.argv[0] or "scripts/train.py", *argv])
    return f"error: {who}the run failed (traceback above) before writing a checkpoint; start again: {again}"


def record_for_torchrun(err: BaseException) -> None:
    """torchrun's error file (what its @record decorator writes), so that its report names this rank
    as the root cause with this traceback. Call it while handling `err`."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)


def main(argv=None, hard_exit: bool = False) -> int:
    """hard_exit: a failed run ends the process by state.exit_deadline should its shutdown hang (the
    script; never where a caller goes on in the same process)."""
    cfg = config_from_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    failed = finished = False
    try:
        try:
            trainer = Trainer(cfg, rank=rank, world=world, log=lambda msg: print(msg, flush=True))
        except (FileNotFoundError, ValueError) as err:  # bad data or weights found while setting up
            print(f"error: {err}", file=sys.stderr)
            return 2
        trainer.run()  # its DataLoader workers are shut down on every way out
        finished = True
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except BadSampleStop as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        if rank == 0:
            print(f"{stop}; resume: {resume_command(argv, stop.out, world)}", file=sys.stderr, flush=True)
        return stop.exit_code
    except Exception as err:  # a bug, an out-of-memory, a driver or a compile error: its traceback is the report
        failed = True
        traceback.print_exc()
        if world > 1:
            record_for_torchrun(err)
        print(failure_message(cfg, argv, rank, world), file=sys.stderr, flush=True)
        sys.stdout.flush()
        if hard_exit:
            state.exit_deadline(1)
        return 1
    finally:
        if failed:
            state.shut_down_compile_workers()
        if world > 1 and dist.is_initialized():
            if failed:
                # the other ranks fail once this one closes its connections; torchrun names as the
                # root cause the failure with the smallest timestamp, in whole seconds: theirs must
                # not tie with the one just recorded
                state.wait_for_next_second()
            if finished:
                # torch 2.11's gloo deadlocks destroying its group while its worker thread still
                # drops the last collective's tensors (that needs the GIL, which destroy holds): a
                # barrier waits with the GIL released, and every rank got here through the same end
                dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(hard_exit=True))
