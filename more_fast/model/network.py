"""The MoRe network (docs/METHOD.md, Network): backbone, classifiers, GCR, LargeFOV decoder.

`forward_features` runs the backbone; `forward_head` applies the heads, so the no-grad CAM
passes (docs/METHOD.md, Multi-scale CAM) can run the backbone alone and the training forward can hand its maps over.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .backbone import BackboneOutput, MoReBackbone
from .flops import step_flops
from .gcr import GCR, NoGCR
from .heads import LargeFOV, classifier_cam, classifier_logits, make_classifier, tokens_to_map
from .published import ATTN_IMPL, DECODER_DIM, GCR_SCORE, NUM_REGISTERS, TOPK_RATIO


@dataclass
class MoReOutput:
    logits: torch.Tensor  # B x K
    aux_logits: torch.Tensor  # B x K
    seg: torch.Tensor  # B x (K+1) x h x w, decoder logits on the patch grid
    class_tokens: torch.Tensor  # B x K x D, after GCR (Q)
    patch_tokens: torch.Tensor  # B x N x D
    aux_patch_tokens: torch.Tensor  # B x N x D
    grid: tuple[int, int]
    class_patch_attn: Optional[torch.Tensor] = None  # B x K x N when asked for


class MoReNet(nn.Module):
    """MoRe: backbone (`encoder`), `classifier`, `aux_classifier`, `graph_layer` (GCR), `decoder`.

    Attribute names follow the published checkpoints (README, Real data) so that they map over.
    """

    # backbone and class count come from the recipe (training.config) or a checkpoint's config; the
    # defaults below are the published architecture's (more_fast/model/published.py)
    def __init__(self, backbone: str, num_classes: int, num_registers: int = NUM_REGISTERS,
                 topk_ratio: float = TOPK_RATIO, gcr_score: str = GCR_SCORE, attn_impl: str = ATTN_IMPL,
                 decoder_bias: bool = False, img_size: Optional[int] = None, depth: Optional[int] = None,
                 decoder_dim: int = DECODER_DIM, patch_size: Optional[int] = None, gcr: bool = True):
        super().__init__()
        self.config = dict(backbone=backbone, num_classes=num_classes, num_registers=num_registers,
                           topk_ratio=topk_ratio, gcr_score=gcr_score, attn_impl=attn_impl,
                           decoder_bias=decoder_bias, img_size=img_size, depth=depth, decoder_dim=decoder_dim,
                           patch_size=patch_size, gcr=gcr)
        self.num_classes = num_classes
        self.encoder = MoReBackbone(backbone, num_classes, num_registers, attn_impl=attn_impl, img_size=img_size,
                                    depth=depth, patch_size=patch_size)
        d = self.encoder.embed_dim
        self.classifier = make_classifier(d, num_classes)
        self.aux_classifier = make_classifier(d, num_classes)
        self.graph_layer = GCR(d, topk_ratio=topk_ratio, score=gcr_score)
        if not gcr:  # the ablation baseline: class tokens go to the losses and the LAM as they are
            # built and dropped, so the decoder below draws the same initial weights as with GCR
            self.graph_layer = NoGCR()
        self.decoder = LargeFOV(d, num_classes, hidden=decoder_dim, bias=decoder_bias)

    def forward_features(self, x: torch.Tensor, attn_reduce: Optional[str] = None) -> BackboneOutput:
        return self.encoder(x, attn_reduce=attn_reduce)

    def forward_head(self, feats: BackboneOutput) -> MoReOutput:
        p, p_aux = feats.patch_tokens, feats.aux_patch_tokens
        return MoReOutput(
            logits=classifier_logits(self.classifier, p),
            aux_logits=classifier_logits(self.aux_classifier, p_aux),
            seg=self.decoder(tokens_to_map(p, feats.grid)),
            class_tokens=self.graph_layer(feats.class_tokens, p),
            patch_tokens=p,
            aux_patch_tokens=p_aux,
            grid=feats.grid,
            class_patch_attn=feats.class_patch_attn,
        )

    def forward(self, x: torch.Tensor, attn_reduce: Optional[str] = None) -> MoReOutput:
        return self.forward_head(self.forward_features(x, attn_reduce=attn_reduce))

    def cams(self, feats: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(CAM, aux CAM), each B x K x h x w, from backbone outputs (no ReLU)."""
        return (classifier_cam(self.classifier, feats.patch_tokens, feats.grid),
                classifier_cam(self.aux_classifier, feats.aux_patch_tokens, feats.grid))

    def train_step_flops(self, crop: int, batch: int, cam_scales: Sequence[float]) -> float:
        """Matmul FLOPs of one training step on `batch` images of `crop` x `crop`: forward and backward of
        the training pass and the no-grad multi-scale CAM passes at `cam_scales` (model/flops.py)."""
        m = self.encoder
        return step_flops(crop, batch, m.embed_dim, len(m.blocks), m.num_prefix, self.num_classes, cam_scales,
                          m.patch_size, self.config["decoder_dim"])

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The five AdamW groups (docs/METHOD.md, VOC recipe): backbone weights, backbone norms, classifiers, GCR, decoder."""
        groups = {"backbone": [], "backbone_norm": [], "classifiers": [], "gcr": [], "decoder": []}
        for name, param in self.encoder.named_parameters():
            is_norm = param.dim() == 1 and ("norm" in name)
            groups["backbone_norm" if is_norm else "backbone"].append(param)
        groups["classifiers"] = list(self.classifier.parameters()) + list(self.aux_classifier.parameters())
        groups["gcr"] = list(self.graph_layer.parameters())
        groups["decoder"] = list(self.decoder.parameters())
        return groups


def model_from_config(config: dict):
    """A MoReNet from a `model_config` dict (MoReNet.config); unknown keys are dropped with a warning."""
    accepted = set(inspect.signature(MoReNet.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        warnings.warn(f"model_config: ignoring keys this version of MoReNet does not take: {unknown}")
    return MoReNet(**{key: value for key, value in config.items() if key in accepted})
