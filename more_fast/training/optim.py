"""AdamW with the five parameter groups (docs/METHOD.md, VOC recipe) and the warm-up + poly schedule."""
from __future__ import annotations

import torch

from ..model.network import MoReNet
from .config import TrainConfig

WARMUP_RATIO = 1e-6


def build_optimizer(model: MoReNet, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = model.param_groups()
    lrs = {"backbone": cfg.backbone_lr, "backbone_norm": cfg.backbone_lr,
           "classifiers": cfg.head_lr, "gcr": cfg.head_lr, "decoder": cfg.head_lr}
    param_groups = [{"params": groups[name], "lr": lrs[name], "weight_decay": cfg.weight_decay, "name": name}
                    for name in ("backbone", "backbone_norm", "classifiers", "gcr", "decoder")]
    return torch.optim.AdamW(param_groups, lr=cfg.head_lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, warmup: int, total: int, power: float = 0.9) -> float:
    """1 - (1 - t/warmup)(1 - 1e-6) during warm-up, then (1 - t/total)^power (t counts from 0)."""
    if step < warmup:
        return 1 - (1 - step / warmup) * (1 - WARMUP_RATIO)
    if step < total:
        return (1 - step / total) ** power
    return 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.scaled("warmup_iters")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, cfg.total_iters, cfg.poly_power))
