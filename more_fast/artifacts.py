"""The artifact ratio: how much of a class's localization mass lands outside that class.

MoRe's claim is that class tokens light up patches of other things ("artifacts") and that GCR
and LIR remove them. This measures it against the ground truth, at the patch level:

- Patch labels. An image's mask Y (H x W; 0 background, c+1 class c, 255 ignore) is cut into the
  h x w patches of the network's grid; patch n gets the label held by most of its pixels, 255
  counted as a label of its own (ties go to the smaller label, 255 last). Patches whose label is
  255 take no part: neither numerator nor denominator.
- A map A (B x K x N over the patches, A >= 0): the last block's class-patch attention of class
  token c (mean over heads of the softmax, `model(x, attn_reduce="mean_softmax")`), or the
  positive part of the LAM on the grid, max(P . Q_c, 0), of the same single-scale forward.
- For each image i and each class c present in its mask (some pixel equal to c + 1):

      r(i, c) = sum_{n : y_n != 255, y_n != c+1} A_c[n]  /  sum_{n : y_n != 255} A_c[n]

  the share of the class's mass on patches of another class or of background: 0 when all of it
  is on the class's own patches, 1 when none is. A pair whose denominator is 0 (no mass on
  labelled patches) is left out.
- Per class: the mean of r(i, c) over the images where it is defined. Overall: the mean over all
  defined (image, class) pairs.
- Chance level ("uniform"): the same ratio for a map spread evenly over the patches, i.e. the
  share of an image's labelled patches that are not the class's. A map that ignores the image
  scores it; a map better than chance scores below it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data.palette import IGNORE_INDEX as IGNORE

MAPS = ("attention", "lam", "uniform")


def patch_labels(mask: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """B x H x W mask -> B x (h*w) patch labels by majority vote (255 where 255 wins).

    A mask whose sides are not multiples of the grid is first resized (nearest) to the nearest
    ones that are."""
    if mask.dim() != 3:
        raise ValueError(f"mask: expected B x H x W, got shape {tuple(mask.shape)}")
    h, w = grid
    b, height, width = mask.shape
    ph, pw = max(1, round(height / h)), max(1, round(width / w))
    mask = mask.long()
    bad = (mask != IGNORE) & ((mask < 0) | (mask > num_classes))
    if bool(bad.any()):
        raise ValueError(f"mask: expected labels 0..{num_classes} or {IGNORE}, got {int(mask[bad][0])}")
    if (height, width) != (h * ph, w * pw):
        mask = F.interpolate(mask[:, None].float(), size=(h * ph, w * pw), mode="nearest")[:, 0].long()
    bins = num_classes + 2  # 0..K, then 255 as the last bin so that it loses ties
    value = torch.where(mask == IGNORE, torch.full_like(mask, num_classes + 1), mask)
    value = value.reshape(b, h, ph, w, pw).permute(0, 1, 3, 2, 4).reshape(b, h * w, ph * pw)
    patch = torch.arange(b * h * w, device=mask.device).reshape(b, h * w, 1)
    counts = torch.bincount((patch * bins + value).flatten(), minlength=b * h * w * bins).reshape(b, h * w, bins)
    label = counts.argmax(dim=-1)  # the first maximum: the smaller label wins a tie
    return torch.where(label == num_classes + 1, torch.full_like(label, IGNORE), label)


def present_classes(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x K bool: class c has at least one pixel (value c + 1) in the mask."""
    values = torch.arange(1, num_classes + 1, device=mask.device)
    return (mask.flatten(1)[:, None, :] == values[None, :, None]).any(dim=-1)


def artifact_ratio(maps: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r(i, c) of every image and class, and whether it is defined. maps B x K x N (>= 0),
    labels B x N (patch labels), present B x K -> (ratio B x K float64, defined B x K bool)."""
    if maps.dim() != 3 or labels.shape != (maps.shape[0], maps.shape[2]) or present.shape != maps.shape[:2]:
        raise ValueError(f"maps B x K x N, labels B x N, present B x K: got {tuple(maps.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(present.shape)}")
    maps = maps.double()
    k = maps.shape[1]
    valid = (labels != IGNORE)[:, None, :]  # B x 1 x N
    own = labels[:, None, :] == torch.arange(1, k + 1, device=labels.device)[None, :, None]  # B x K x N
    total = (maps * valid).sum(-1)
    outside = (maps * (valid & ~own)).sum(-1)
    defined = present.bool() & (total > 0)
    return torch.where(defined, outside / total.clamp_min(1e-300), torch.zeros_like(total)), defined


class ArtifactMeter:
    """Sums r(i, c) and counts the defined pairs per class, for each map, over an evaluation."""

    def __init__(self, num_classes: int, device: Optional[torch.device] = None):
        self.num_classes = num_classes
        self.sums = {name: torch.zeros(num_classes, dtype=torch.float64, device=device) for name in MAPS}
        self.counts = {name: torch.zeros(num_classes, dtype=torch.float64, device=device) for name in MAPS}

    def update(self, masks: torch.Tensor, grid: tuple[int, int], attention: torch.Tensor,
               lam: torch.Tensor) -> None:
        """masks B x H x W; attention B x K x N (class-patch attention); lam B x K x N (LAM on the grid,
        the raw P . Q: its positive part is used)."""
        labels = patch_labels(masks, grid, self.num_classes)
        present = present_classes(masks.long(), self.num_classes)
        for name, maps in (("attention", attention), ("lam", lam.float().clamp_min(0)),
                           ("uniform", torch.ones_like(attention))):
            ratio, defined = artifact_ratio(maps.flatten(2), labels, present)
            self.sums[name] = self.sums[name].to(ratio.device) + (ratio * defined).sum(0)
            self.counts[name] = self.counts[name].to(ratio.device) + defined.sum(0)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            for name in MAPS:
                dist.all_reduce(self.sums[name])
                dist.all_reduce(self.counts[name])

    def result(self) -> dict:
        """{"attention", "lam", "uniform": overall ratio (None without any pair), "<map>_per_class":
        K values (None for a class never present), "pairs": the number of (image, class) pairs}."""
        out = {}
        for name in MAPS:
            s, n = self.sums[name].cpu(), self.counts[name].cpu()
            out[name] = float(s.sum() / n.sum()) if n.sum() > 0 else None
            out[f"{name}_per_class"] = [float(a / b) if b > 0 else None for a, b in zip(s.tolist(), n.tolist())]
        out["pairs"] = int(self.counts["attention"].sum())
        return out


def format_artifacts(result: dict, per_class_limit: int = 20) -> str:
    """The printed rows: overall ratios and, up to `per_class_limit` classes, the per-class ones."""
    rows = ["artifact ratio (share of a present class's mass on patches of other classes or background; "
            "lower is better)"]
    for name, label in (("attention", "class-patch attention"), ("lam", "LAM (positive part)"),
                        ("uniform", "uniform map (chance)")):
        value = result.get(name)
        row = f"  {label:<22}{'n/a' if value is None else f'{value:.3f}':>8}"
        per_class = result.get(f"{name}_per_class") or []
        if 0 < len(per_class) <= per_class_limit:
            row += "   per class: " + " ".join("-" if v is None else f"{v:.2f}" for v in per_class)
        rows.append(row)
    return "\n".join(rows)


@torch.no_grad()
def measure_artifacts(model, loader, num_classes: int, device: torch.device, amp_dtype=None) -> dict:
    """The artifact ratios of a model on a loader of {"image" (uint8), "mask"} batches: one
    single-scale forward per batch, with the fused class-patch attention extraction."""
    from . import cam as C
    from .data import normalize

    was_training = model.training
    model.eval()
    meter = ArtifactMeter(num_classes, device)
    for batch in loader:
        x = normalize(batch["image"].to(device, non_blocking=True))
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(x, attn_reduce="mean_softmax")
        lam = C.lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid)
        meter.update(batch["mask"].to(device, non_blocking=True), out.grid, out.class_patch_attn, lam)
    meter.all_reduce()
    model.train(was_training)
    return meter.result()
