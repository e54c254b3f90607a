"""Resumable, deterministic data order and augmentation for training.

Sample number p of the run (per rank) maps to (epoch, offset) -> (image index, augmentation
seed): epoch e shuffles with a generator seeded from (seed, e), and each sample's random crop,
flip and jitter are drawn under a seed of its own. A run resumed at iteration t therefore sees
exactly the batches that an uninterrupted run sees, with any number of DataLoader workers.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # its exit handler is registered now, before ours: ours runs first
import pathlib
import signal
import time
from typing import Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .. import data as D
from ..data.voc import BadSample
from .config import TrainConfig

_MIX = (1 << 61) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index * 7_919 + 12_345) % _MIX


class ResumableSampler(Sampler):
    """An endless stream of (index, augmentation seed), sharded over ranks, starting at `start`."""

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if size < world:
            raise ValueError(f"data: {size} training images cannot be shared by {world} ranks")
        self.size, self.seed, self.start, self.rank, self.world = size, seed, start, rank, world
        self.per_rank = size // world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch, perm = -1, None
        while True:
            e, offset = divmod(position, self.per_rank)
            if e != epoch:
                g = torch.Generator().manual_seed(self.seed * 7_777 + e)
                perm = torch.randperm(self.size, generator=g)[self.rank::self.world][: self.per_rank]
                epoch = e
            index = int(perm[offset])
            yield index, sample_seed(self.seed, e, index)
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


class SeededSamples(Dataset):
    """Wraps a data set so that sample (index, seed) is augmented under its own RNG seed.

    Every sample carries "bad": "" when it was read as listed. A sample that cannot be read
    (BadSample) is, with on_bad="stop", a zero placeholder whose "bad" is "path<TAB>reason" (the
    training loop stops before using its batch); with on_bad="skip", the next readable sample
    of the split in index order, augmented under the same seed (so a resumed run replaces it
    the same way), with a "path<TAB>reason" line per sample passed over in "bad". The
    decision is the loop's: a worker cannot stop the run, it can only report.
    """

    def __init__(self, dataset: Dataset, on_bad: str = "stop"):
        if on_bad not in ("stop", "skip"):
            raise ValueError(f"on_bad: expected 'stop' or 'skip', got {on_bad!r}")
        self.dataset, self.on_bad = dataset, on_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        reasons = []
        for step in range(len(self.dataset)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    sample = self.dataset[(index + step) % len(self.dataset)]
                except BadSample as err:
                    reasons.append(f"{err.path}\t{err}")
                    if self.on_bad == "stop":
                        return self._placeholder(index, reasons[-1])
                    continue
            sample["bad"] = "\n".join(reasons)
            return sample
        raise BadSample(f"no sample of the split can be read; the first: {reasons[0].split(chr(9), 1)[1]}")

    def _placeholder(self, index: int, reason: str) -> dict:
        ds, crop = self.dataset, self.dataset.crop_size
        return {"image": torch.zeros(3, crop, crop, dtype=torch.uint8),
                "mask": torch.zeros(crop, crop, dtype=torch.long),
                "cls_label": torch.zeros(ds.num_classes), "name": "", "index": index, "bad": reason}


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: the main process owns SIGINT / SIGTERM / SIGUSR1 (it saves and stops
    the run); a worker killed or interrupted by them would make the main process fail mid-step.

    The price: such a worker outlives terminate(), which is how both torch (a worker that does
    not leave when told) and multiprocessing's exit handler (every daemonic child, each then joined
    without a timeout) end one. Hence shutdown_workers and _end_daemonic_children."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def shutdown_workers(batches) -> None:
    """End the worker processes of a DataLoader iterator now, on every way out of its loop.

    Left to garbage collection, a failed run's workers live on: the traceback holds the frame that
    holds the iterator, and at exit multiprocessing joins workers that ignore its SIGTERM, forever
    (persistent workers never leave by themselves). The iterator's own shutdown tells them to leave
    and waits a few seconds; one still alive then (stuck in a read) is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # no worker processes (workers 0), or not a DataLoader iterator
        return
    try:
        shutdown()
    finally:
        for worker in getattr(batches, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


@atexit.register  # after multiprocessing's own (imported above), so it runs before that one
def _end_daemonic_children(grace: float = 2.0) -> None:
    """At exit: what multiprocessing's exit handler does with daemonic children (DataLoader workers
    among them), terminate() and join(), but with the join bounded and those that ignore SIGTERM
    (ours, ignore_stop_signals) killed. It only finds workers nobody shut down: a script that let
    its loader's exception escape."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    # torch's SIGCHLD handler would raise in the joins below for each worker that the signals end
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(timeout=grace)


class SkipBad(Dataset):
    """Evaluation: a sample that cannot be read becomes {"bad": reason}; see `skip_bad`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except BadSample as err:
            return {"bad": str(err)}


def collate_skipping_bad(batch: list) -> dict:
    good = [s for s in batch if "bad" not in s]
    out = default_collate(good) if good else {}
    out["bad"] = [s["bad"] for s in batch if "bad" in s]
    return out


def skip_bad(loader: Iterable, report=print) -> Iterator:
    """The batches of an evaluation loader over SkipBad samples, each unreadable sample reported
    in one line (`report`) and left out; a batch with nothing left is not yielded. Batches are
    dicts (collate_skipping_bad) or lists of samples."""
    for batch in loader:
        if isinstance(batch, dict):
            bad = batch.pop("bad", [])
            empty = "image" not in batch
        else:
            bad = [s["bad"] for s in batch if "bad" in s]
            batch = [s for s in batch if "bad" not in s]
            empty = not batch
        for reason in bad:
            report(f"skipped: {reason}")
        if not empty:
            yield batch


class _SkippingLoader:
    """A DataLoader whose iteration reports and leaves out unreadable samples (see skip_bad).

    close() (or leaving a `with` block) ends the worker processes of every iteration begun, also
    of one abandoned by an exception."""

    def __init__(self, loader: DataLoader, report):
        self.loader, self.report = loader, report
        self._started: list = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        self._started.append(batches)
        return skip_bad(batches, self.report)

    def close(self) -> None:
        while self._started:
            shutdown_workers(self._started.pop())

    def __enter__(self) -> "_SkippingLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_data_root(cfg: TrainConfig) -> pathlib.Path:
    """The data folder; for the synthetic set, generated on first use (in the VOC layout)."""
    if cfg.data == "synthetic":
        root = pathlib.Path(cfg.data_root or "data_cache/synthetic")
        return D.make_synthetic_voc(root, num_train=cfg.synthetic_train, num_val=cfg.synthetic_val,
                                    num_classes=cfg.num_classes, seed=1234)
    if cfg.data_root is None:
        raise ValueError(f"--data-root: required with --data {cfg.data}")
    root = pathlib.Path(cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root: no such folder {root}")
    return root


def build_dataset(cfg: TrainConfig, root: pathlib.Path, split: str, train: bool,
                  split_list: Optional[str] = None) -> Dataset:
    if cfg.data == "coco":
        return D.coco_dataset(root, split, train, cfg.crop_size, split_list=split_list)
    if cfg.data == "voc":
        return D.voc_dataset(root, split, train, cfg.crop_size, split_list=split_list)
    return D.SegmentationDataset(root, split, cfg.num_classes, train, cfg.crop_size, split_list=split_list,
                                 class_names=D.SYNTHETIC_CLASSES[: cfg.num_classes])


def train_loader(dataset: Dataset, cfg: TrainConfig, start_sample: int, device: torch.device,
                 rank: int = 0, world: int = 1, on_bad: str = "stop", workers: Optional[int] = None) -> DataLoader:
    """`workers`: the DataLoader workers to start (the Trainer's, capped at the free cores), else cfg.workers."""
    workers = cfg.workers if workers is None else workers
    sampler = ResumableSampler(len(dataset), cfg.seed, start_sample, rank, world)
    # a generator of its own: the loader's draw of its workers' base seed would otherwise advance
    # the global RNG once per run, so a resumed run's RNG state would differ from an uninterrupted one's
    return DataLoader(SeededSamples(dataset, on_bad), batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(cfg.seed))


def eval_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, rank: int = 0,
                world: int = 1, report=print, workers: Optional[int] = None) -> _SkippingLoader:
    """Evaluation batches of this rank's shard; an unreadable sample is reported in one line and skipped.
    `workers` as train_loader's."""
    workers = cfg.workers if workers is None else workers
    indices = list(range(rank, len(dataset), world))  # a shard per rank; confusion matrices are summed
    subset = torch.utils.data.Subset(SkipBad(dataset), indices)
    return _SkippingLoader(DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                                      pin_memory=device.type == "cuda", collate_fn=collate_skipping_bad,
                                      worker_init_fn=ignore_stop_signals), report)
