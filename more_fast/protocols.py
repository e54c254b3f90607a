"""Evaluation protocols of a trained MoReNet (docs/METHOD.md, Evaluation), used by scripts/evaluate.py and scripts/infer.py.

`train-val`: the validation run during training (more_fast.training.evaluate): images and masks
resized to crop x crop, the training CAM scales, ground-truth image labels, the recipe's
background score (VOC 0.5, COCO 0.45).

`published`: the protocols behind the published numbers, scored at each image's original size:
- the network input is the image resized (bilinear) to crop x crop (448 for VOC);
- CAM, aux CAM and LAM: multi-scale + flip maps, scales (1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0)
  (more_fast.cam.multiscale_maps: max of a map and its flipped twin, ReLU for the CAMs only, sum,
  min-max per class), resized bilinearly to the original size; image labels from the classifier
  of the scale-1.0 pass, sigmoid(logit) > 0.5 (that is logit > 0), the published `cam2seg`
  choice (its other choice, ground-truth labels, is `image_labels="gt"`). An image for which the
  classifier predicts no class takes the classes that the decoder's argmax (scale-1.0 pass, on
  the patch grid) gives to at least 5 patches (published tools/infer_lam.py). Label = argmax
  over [0.5 | maps of the labelled classes];
- decoder (published tools/infer_seg_voc.py, `decoder_protocol="published"`): for each scale
  (1.0, 1.25, 1.5) the image resized to scale x crop, the decoder logits of it plus the
  flipped-back logits of its flip, resized bilinearly to the original size; the elementwise max
  over scales; argmax. `decoder_protocol="mean_prob"` instead averages the softmax probabilities
  of the 6 passes (a proper ensemble, not the published protocol);
- optional dense CRF (more_fast.crf, the published parameters, docs/METHOD.md, Published protocols) on the LAM (scores [1 - max | maps], as
  published) and on the decoder (published: the softmax of the max-over-scales logits).
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from . import cam as C
from .data import normalize
from .data.labels import read_mask
from .model.heads import tokens_to_map
from .training.evaluate import confusion, miou
from .data.palette import IGNORE_INDEX as IGNORE

PUBLISHED_CAM_SCALES = (1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0)
PUBLISHED_SEG_SCALES = (1.0, 1.25, 1.5)
PUBLISHED_BKG = 0.5
MAP_NAMES = ("cam", "aux_cam", "lam", "decoder")


class OriginalSize(Dataset):
    """The images of a SegmentationDataset at their own size, with their masks (all 255 without)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        ds = self.dataset
        with Image.open(ds.image_paths[index]) as pil:
            image = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
        if ds.has_masks:
            mask = torch.from_numpy(read_mask(ds.mask_paths[index]).astype(np.int64))
        else:
            mask = torch.full(image.shape[1:], IGNORE, dtype=torch.int64)
        return {"image": image, "mask": mask, "cls_label": torch.as_tensor(ds.cls_labels[index]),
                "name": ds.names[index]}


def collate_list(batch: list) -> list:
    return batch


def network_input(images: Sequence[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """uint8 3 x H_i x W_i images -> B x 3 x size x size, normalized, then resized (bilinear) as published."""
    out = [F.interpolate(normalize(img, device)[None], size=(size, size), mode="bilinear", align_corners=False)
           for img in images]
    return torch.cat(out, dim=0)


def _patch_round(side: int, patch: int) -> int:
    return max(patch, round(side / patch) * patch)


DECODER_PROTOCOLS = ("published", "mean_prob")
FALLBACK_MIN_PIXELS = 5


@torch.no_grad()
def published_maps(model, x: torch.Tensor, cam_scales: Sequence[float] = PUBLISHED_CAM_SCALES,
                   seg_scales: Sequence[float] = PUBLISHED_SEG_SCALES, amp_dtype=None,
                   seg_inputs: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """Maps of the published protocols. x: B x 3 x S x S normalized.

    seg_inputs: the decoder's input of each seg scale (B x 3 x s x s); by default x resized, the
    published script resizes the original image instead (evaluate_published passes that).
    Returns logits (B x K), cam / aux_cam / lam (B x K x S x S in [0, 1]), seg_grid (B x (K+1) x h x w,
    the decoder logits of the unflipped scale-1.0 pass on the grid) and seg_logits (one
    2B x (K+1) x h_s x w_s tensor per seg scale, the decoder logits of [x_s, flip(x_s)] on the
    grid), all float32.
    """
    _, _, height, width = x.shape
    patch = model.encoder.patch_size
    if seg_inputs is None:
        seg_inputs = [x if scale == 1.0 else F.interpolate(
            x, size=[_patch_round(int(scale * s), patch) for s in (height, width)], mode="bilinear",
            align_corners=False) for scale in seg_scales]
    if len(seg_inputs) != len(seg_scales):
        raise ValueError(f"seg_inputs: expected one input per seg scale ({len(seg_scales)}), got {len(seg_inputs)}")
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = model(x)
        reuse = model.cams(out) + (C.lam_from_tokens(out.patch_tokens, out.class_tokens, out.grid),)
        maps = C.multiscale_maps(model, x, cam_scales, reuse=reuse, with_lam=True)
        seg_logits = []
        for xs in seg_inputs:
            feats = model.forward_features(torch.cat([xs, xs.flip(-1)], dim=0))
            seg_logits.append(model.decoder(tokens_to_map(feats.patch_tokens, feats.grid)).float())
    maps = {name: m.float() for name, m in maps.items()}
    maps["logits"] = out.logits.float()
    maps["seg_grid"] = out.seg.float()
    maps["seg_logits"] = seg_logits
    return maps


def decoder_scores(seg_logits: Sequence[torch.Tensor], index: int, size: Sequence[int],
                   protocol: str = "published") -> torch.Tensor:
    """(K+1) x H x W decoder scores of image `index` at `size` from published_maps' seg_logits.

    published: per scale, the logits of x plus the flipped-back logits of flip(x), each resized
    bilinearly to `size`; the elementwise max over scales (logits; the CRF takes their softmax).
    mean_prob: the mean of the softmax probabilities of all passes (probabilities).
    """
    if protocol not in DECODER_PROTOCOLS:
        raise ValueError(f"decoder_protocol: expected one of {DECODER_PROTOCOLS}, got {protocol!r}")
    scores = []
    for logits in seg_logits:
        b = logits.shape[0] // 2
        pair = F.interpolate(logits[index::b], size=tuple(size), mode="bilinear", align_corners=False)  # x, flip x
        if protocol == "published":
            scores.append(pair[0] + pair[1].flip(-1))
        else:
            prob = pair.softmax(dim=1)
            scores.append(prob[0] + prob[1].flip(-1))
    if protocol == "published":
        return torch.stack(scores).amax(dim=0)
    return torch.stack(scores).sum(dim=0) / (2 * len(scores))


def image_labels_with_fallback(logits: torch.Tensor, seg_grid: torch.Tensor,
                               min_pixels: int = FALLBACK_MIN_PIXELS) -> torch.Tensor:
    """B x K image labels: the classifier's (logit > 0); an image with none takes the classes that
    the decoder's argmax on the grid (B x (K+1) x h x w logits) gives to >= min_pixels patches.
    (The published loop skips the count for the first class it finds when no patch is background,
    as it assumes background comes first; here every class is counted.)"""
    predicted = (logits > 0).float()
    arg = seg_grid.argmax(dim=1).flatten(1)  # B x hw
    counts = torch.zeros(seg_grid.shape[0], seg_grid.shape[1], device=seg_grid.device)
    counts.scatter_add_(1, arg, torch.ones_like(arg, dtype=counts.dtype))
    from_decoder = (counts[:, 1:] >= min_pixels).float()
    return torch.where(predicted.sum(dim=1, keepdim=True) > 0, predicted, from_decoder)


def _crf_job(args):
    from .crf import crf_map_labels, crf_prob_labels

    kind, image, scores, present, backend = args
    if kind == "map":
        out = crf_map_labels(image, scores, present, backend=backend)
    else:
        out = crf_prob_labels(image, scores, backend=backend)
    return out.cpu().numpy() if isinstance(out, torch.Tensor) else out


@torch.no_grad()
def evaluate_published(model, loader, device: torch.device, crop_size: int,
                       cam_scales: Sequence[float] = PUBLISHED_CAM_SCALES,
                       seg_scales: Sequence[float] = PUBLISHED_SEG_SCALES, bkg: float = PUBLISHED_BKG,
                       image_labels: str = "classifier", crf: bool = False, amp_dtype=None,
                       save: Optional[callable] = None, save_map: str = "lam",
                       executor: Optional[Executor] = None, progress=None,
                       decoder_protocol: str = "published", crf_backend: str = "auto") -> dict[str, float]:
    """mIoU (percent) of cam, aux_cam, lam, decoder (and lam_crf, decoder_crf with `crf`) over a
    loader of OriginalSize samples (lists of dicts). `save(name, label_map)` receives the chosen
    prediction (`save_map`, its CRF version when `crf`) of every image, H x W uint8 at the
    original size. `decoder_protocol`: "published" (max over scales of the flip-summed logits) or
    "mean_prob" (mean softmax). Also returns "images" and "labelled_classes" (mean classes per
    image). `crf_backend` (more_fast.crf.dense_crf): the lattice ("auto", "lattice") runs on `device`;
    "pydensecrf" on the CPU (in `executor`'s processes when given)."""
    if image_labels not in ("classifier", "gt"):
        raise ValueError(f"image_labels: expected 'classifier' or 'gt', got {image_labels!r}")
    if decoder_protocol not in DECODER_PROTOCOLS:
        raise ValueError(f"decoder_protocol: expected one of {DECODER_PROTOCOLS}, got {decoder_protocol!r}")
    if crf:
        from .crf import require_crf

        require_crf(crf_backend)
    model.eval()
    k1 = model.num_classes + 1
    names = MAP_NAMES + (("lam_crf", "decoder_crf") if crf else ()) + ("background",)
    confs = {name: torch.zeros(k1, k1, dtype=torch.int64) for name in names}
    count, labelled = 0, 0.0
    for batch in loader:
        originals = [s["image"] for s in batch]
        x = network_input(originals, crop_size, device)
        patch = model.encoder.patch_size
        # the published decoder script resizes the original image to each scale, not the crop
        seg_inputs = [x if scale == 1.0 else
                      network_input(originals, _patch_round(int(scale * crop_size), patch), device)
                      for scale in seg_scales]
        maps = published_maps(model, x, cam_scales, seg_scales, amp_dtype, seg_inputs=seg_inputs)
        if image_labels == "classifier":  # sigmoid(logit) > 0.5, else the decoder's classes
            labels = image_labels_with_fallback(maps["logits"], maps["seg_grid"])
        else:
            labels = torch.stack([s["cls_label"] for s in batch]).to(device).float()
        jobs, preds_all = [], []
        for i, sample in enumerate(batch):
            size = tuple(sample["mask"].shape)
            preds = {}
            resized = {}
            for name in ("cam", "aux_cam", "lam"):
                resized[name] = F.interpolate(maps[name][i:i + 1], size=size, mode="bilinear", align_corners=False)
                preds[name] = C.map_prediction(resized[name], labels[i:i + 1], bkg)[0].cpu()
            scores = decoder_scores(maps["seg_logits"], i, size, decoder_protocol)
            preds["decoder"] = scores.argmax(dim=0).cpu()
            if crf:
                prob = scores.softmax(dim=0) if decoder_protocol == "published" else scores
                if crf_backend == "pydensecrf":
                    image = sample["image"].permute(1, 2, 0).numpy()
                    jobs.append(("map", image, resized["lam"][0].cpu().numpy(), labels[i].cpu().numpy() > 0, crf_backend))
                    jobs.append(("prob", image, prob.cpu().numpy(), None, crf_backend))
                else:  # the lattice, on the evaluation device
                    image = sample["image"].permute(1, 2, 0).contiguous().to(device)
                    jobs.append(("map", image, resized["lam"][0], labels[i] > 0, crf_backend))
                    jobs.append(("prob", image, prob, None, crf_backend))
            preds_all.append(preds)
            labelled += float(labels[i].sum())
        if crf:
            pool = executor is not None and crf_backend == "pydensecrf"
            results = list(executor.map(_crf_job, jobs)) if pool else [_crf_job(j) for j in jobs]
            for i, preds in enumerate(preds_all):
                preds["lam_crf"] = torch.from_numpy(results[2 * i].astype(np.int64))
                preds["decoder_crf"] = torch.from_numpy(results[2 * i + 1].astype(np.int64))
        for sample, preds in zip(batch, preds_all):
            mask = sample["mask"]
            for name in names[:-1]:
                confs[name] += confusion(preds[name], mask, k1)
            confs["background"] += confusion(torch.zeros_like(mask), mask, k1)
            if save is not None:
                chosen = preds[f"{save_map}_crf"] if crf and f"{save_map}_crf" in preds else preds[save_map]
                save(sample["name"], chosen.numpy().astype(np.uint8))
        count += len(batch)
        if progress is not None:
            progress(count)
    results = {name: 100.0 * miou(conf)[0] for name, conf in confs.items()}
    results["images"] = count
    results["labelled_classes"] = labelled / max(count, 1)
    results["has_ground_truth"] = bool(sum(int(c.sum()) for c in confs.values()) > 0)
    return results
