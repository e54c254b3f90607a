"""TensorBoard output of a training run (`--tensorboard`): the metrics.jsonl scalars and the panels.

Event files go to `<out>/tensorboard`. Every number of a metrics.jsonl record becomes a scalar at
step `iter`: training records under `train/<key>` (loss, each loss term, lr, img_per_s, ...),
evaluation records under `eval/<map>` (the mIoU of each map, in percent). Each evaluation's panel
PNGs become images `panels/<image name>` at the evaluation's iteration. The writer flushes after
every call, so a run that stops (or is killed) loses nothing already logged. Only rank 0 writes.

TensorBoard is an optional extra (`pip install -e ".[tensorboard]"`); without it, asking for
`--tensorboard` fails before training starts with one line that says so.
"""
from __future__ import annotations

import pathlib
import numpy as np
from PIL import Image

_MISSING = ("--tensorboard: needs the tensorboard package, which is not installed "
            "(pip install -e \".[tensorboard]\" or pip install tensorboard)")


class TensorBoardLog:
    """A SummaryWriter that takes metrics.jsonl records and panel folders."""

    def __init__(self, log_dir: pathlib.Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch.utils.tensorboard raises ImportError naming tensorboard
            raise ValueError(_MISSING) from err
        self.log_dir = pathlib.Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def record(self, record: dict) -> None:
        """One metrics.jsonl record: {"iter": t, ...numbers} or {"iter": t, "eval": {map: mIoU}}."""
        step = int(record["iter"])
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def panels(self, folder: pathlib.Path, step: int) -> None:
        """Every PNG of an evaluation's panel folder (none: nothing), as H x W x 3 images tagged by file name."""
        for path in sorted(pathlib.Path(folder).glob("*.png")):
            image = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(f"panels/{path.stem}", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def scalars_of(record: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, tagged as TensorBoard shows them."""
    out = {}
    for key, value in record.items():
        if key == "iter":
            continue
        if isinstance(value, dict):  # the evaluation table
            for name, v in value.items():
                if _is_number(v):
                    out[f"{key}/{name}"] = float(v)
        elif _is_number(value):
            out[f"train/{key}"] = float(value)
    return out


def _is_number(value) -> bool:
    # bool is an int subclass but no metric; NaN and inf stay, so that a diverged term shows
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class NoLog:
    """What a run without --tensorboard (or a rank other than 0) logs to: nothing."""

    def record(self, record: dict) -> None:
        pass

    def panels(self, folder: pathlib.Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_log(enabled: bool, out: pathlib.Path, is_main: bool = True):
    """The run's TensorBoard log under `<out>/tensorboard`; a NoLog when off or not on rank 0."""
    if not enabled or not is_main:
        return NoLog()
    return TensorBoardLog(pathlib.Path(out) / "tensorboard")
