"""Resumable, deterministic data order and augmentation for training.

Sample number p of the run (per rank) maps to (epoch, offset) -> (image index, augmentation
seed): epoch e shuffles with a generator seeded from (seed, e), and each sample's random crop,
flip and jitter are drawn under a seed of its own. A run resumed at iteration t therefore sees
exactly the batches that an uninterrupted run sees, with any number of DataLoader workers.
"""
from __future__ import annotations

import pathlib
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import data as D
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
    """Wraps a data set so that sample (index, seed) is augmented under its own RNG seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


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
                 rank: int = 0, world: int = 1) -> DataLoader:
    sampler = ResumableSampler(len(dataset), cfg.seed, start_sample, rank, world)
    return DataLoader(SeededSamples(dataset), batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=cfg.workers > 0)


def eval_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, rank: int = 0,
                world: int = 1) -> DataLoader:
    indices = list(range(rank, len(dataset), world))  # a shard per rank; confusion matrices are summed
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                      pin_memory=device.type == "cuda")
