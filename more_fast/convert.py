"""Published MoRe checkpoints (README, Real data) -> more_fast checkpoints ({"model", "model_config"}).

The published network (zwyang6/MoRe) is the same math as MoReNet with the same parameter names,
so conversion is mostly bookkeeping:
- unwrap a top-level "model" / "state_dict" entry and strip a "module." (DDP) prefix;
- infer the shapes: K from `classifier.weight` (K x D x 1 x 1), R + K from `encoder.cls_token`
  (1 x (R+K) x D), the pretrained patch grid from `encoder.pos_embed` (1 x (R+K+G*G) x D), the
  patch size from `encoder.patch_embed.proj.weight`, depth from `encoder.blocks.<i>`;
- pick the timm backbone from (D, depth); the number of heads is not stored in any tensor and
  follows from that name (ViT-Ti 3, ViT-S 6, ViT-B 12, ViT-L 16). A network on another timm
  family (DINOv2, DeiT-III, CLIP, SigLIP, EVA-02, BEiT) is not told apart by its tensors alone:
  name it (`backbone=`, or the file's own "model_config"); depth, patch size and pretrained grid
  are then read from the tensors as above (BEiT, without absolute position embeddings: the grid
  from its relative position bias table);
- drop the tensors the published code holds but never uses: the GCR's `graph_layer._fc1.*` and
  the ViT classification head `encoder.head.*`; any other key that MoReNet has no place for is
  an error (or, with `ignore_unknown`, dropped and listed);
- a decoder with biases (`decoder.conv6.bias`, ...) gives MoReNet(decoder_bias=True).
"""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .io import WRAPPER_KEYS, save_atomic, strip_prefixes, torch_load
from .model.network import model_from_config

# (embed dim, depth) -> timm name; heads follow from the name
BACKBONES = {
    (192, 12): "vit_tiny_patch16_224",
    (384, 12): "vit_small_patch16_224",
    (768, 12): "vit_base_patch16_224",
    (1024, 24): "vit_large_patch16_224",
}
# keys of the published checkpoints that MoReNet does not have, on purpose
UNUSED_PREFIXES = ("graph_layer._fc1.", "encoder.head.", "encoder.head_dist.")
FORMAT = "more_fast.model/1"


@dataclass
class ConversionReport:
    backbone: str = ""
    num_classes: int = 0
    num_registers: int = 0
    embed_dim: int = 0
    depth: int = 0
    patch_size: int = 0
    grid: int = 0
    decoder_bias: bool = False
    dropped: list = field(default_factory=list)  # known unused tensors
    unknown: list = field(default_factory=list)  # tensors with no place in MoReNet (ignore_unknown)

    def summary(self) -> str:
        lines = [f"backbone {self.backbone} (D {self.embed_dim}, depth {self.depth}, patch {self.patch_size}, "
                 f"pretrained grid {self.grid} x {self.grid})",
                 f"K = {self.num_classes} classes, R = {self.num_registers} registers, "
                 f"decoder {'with' if self.decoder_bias else 'without'} biases"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} unused tensors: {', '.join(self.dropped)}")
        if self.unknown:
            lines.append(f"dropped {len(self.unknown)} UNKNOWN tensors: {', '.join(self.unknown)}")
        return "\n".join(lines)


def unwrap(obj) -> dict:
    """The state dict inside a published checkpoint file's object."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError("expected a state dict (name -> tensor)")
    bad = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"expected a state dict (name -> tensor); these entries are not tensors: {bad[:5]}")
    return strip_prefixes(obj)


def _need(state: dict, key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"missing tensor '{key}' (is this a published MoRe checkpoint? it has "
                         f"{len(state)} tensors, e.g. {sorted(state)[:4]})")
    value = state[key]
    if value.dim() != ndim:
        raise ValueError(f"'{key}' has shape {tuple(value.shape)}; expected {ndim} dimensions")
    return value


def _timm_defaults(name: str) -> tuple[int, int, int]:
    """(depth, patch size, pretrained image size) of a timm model, from a weightless instance."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"backbone: unknown timm model {name!r}")
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False)
    embed = getattr(vit, "patch_embed", None)
    if embed is None or not hasattr(vit, "blocks"):
        raise ValueError(f"backbone: {name!r} is not a ViT (no patch embedding and blocks)")
    return len(vit.blocks), int(embed.patch_size[0]), int(embed.img_size[0])


def _named_grid(state: dict, n_patch_pos: int) -> int:
    """The pretrained grid side: from the patch position embeddings, else from a BEiT bias table."""
    if n_patch_pos > 0:
        g = int(round(n_patch_pos ** 0.5))
        if g * g != n_patch_pos:
            raise ValueError(f"encoder.pos_embed holds {n_patch_pos} patch positions, not a square grid")
        return g
    for key in ("encoder.blocks.0.attn.relative_position_bias_table",
                "encoder.rel_pos_bias.relative_position_bias_table"):
        if key in state:
            side = int(round((state[key].shape[0] - 3) ** 0.5))  # (2g - 1)^2 distances + 3 class-token entries
            if side * side + 3 != state[key].shape[0] or side % 2 == 0:
                raise ValueError(f"'{key}' has {state[key].shape[0]} rows, not (2g - 1)^2 + 3 for a square grid g")
            return (side + 1) // 2
    raise ValueError("no patch position embeddings and no relative position bias table: the pretrained grid "
                     "cannot be read from the tensors")


def convert_state_dict(obj, ignore_unknown: bool = False,
                       backbone: Optional[str] = None) -> tuple[dict, dict, ConversionReport]:
    """(MoReNet state dict, model_config, report) from a published MoRe checkpoint's object (or a
    more_fast one). backbone: the timm name of the encoder; None infers a plain ViT from (D, depth),
    or takes the name from the object's own "model_config"."""
    if backbone is None and isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):
        backbone = obj["model_config"].get("backbone")
    state = unwrap(obj)
    rep = ConversionReport()
    classifier = _need(state, "classifier.weight", 4)  # K x D x 1 x 1
    k, d = classifier.shape[:2]
    cls = _need(state, "encoder.cls_token", 3)  # 1 x (R+K) x D
    pos = _need(state, "encoder.pos_embed", 3)  # 1 x (R+K+G*G) x D
    proj = _need(state, "encoder.patch_embed.proj.weight", 4)  # D x 3 x p x p
    if cls.shape[-1] != d or pos.shape[-1] != d or proj.shape[0] != d:
        raise ValueError(f"widths disagree: classifier {d}, cls_token {cls.shape[-1]}, pos_embed "
                         f"{pos.shape[-1]}, patch_embed {proj.shape[0]}")
    r = cls.shape[1] - k
    if r < 0:
        raise ValueError(f"encoder.cls_token holds {cls.shape[1]} tokens, fewer than the {k} classes of "
                         "the classifier")
    n = pos.shape[1] - cls.shape[1]
    patch = proj.shape[-1]
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", key))}
    depth = max(blocks) + 1 if blocks else 0
    if blocks != set(range(depth)):
        raise ValueError(f"encoder.blocks: expected blocks 0..{depth - 1}, found {sorted(blocks)}")
    named = {}  # model_config entries that a named backbone adds
    if backbone is None:
        g = int(round(max(n, 0) ** 0.5))
        if n <= 0 or g * g != n:
            raise ValueError(f"encoder.pos_embed holds {pos.shape[1]} positions: {cls.shape[1]} prefix tokens "
                             f"leave {n}, not a square patch grid")
        name = BACKBONES.get((d, depth))
        if name is None:
            known = ", ".join(f"D {dd} / depth {dp} -> {nm}" for (dd, dp), nm in BACKBONES.items())
            raise ValueError(f"no known ViT with embed dim {d} and depth {depth} (found in the checkpoint); "
                             f"known: {known} (another timm family: name it, backbone=...)")
        if patch != 16:
            raise ValueError(f"patch size {patch} (encoder.patch_embed.proj.weight {tuple(proj.shape)}); the known "
                             f"backbones use 16")
        img_size = None if g * patch == 224 else g * patch
    else:
        name = backbone
        default_depth, default_patch, default_img = _timm_defaults(name)
        g = _named_grid(state, n)
        named = dict(depth=None if depth == default_depth else depth,
                     patch_size=None if patch == default_patch else patch)
        img_size = None if g == default_img // patch else g * patch
    conv8 = _need(state, "decoder.conv8.weight", 4)
    if conv8.shape[0] != k + 1:
        raise ValueError(f"decoder.conv8 has {conv8.shape[0]} outputs; expected K + 1 = {k + 1}")
    conv6 = _need(state, "decoder.conv6.weight", 4)  # hidden x D x 3 x 3
    biases = [f"decoder.conv{i}.bias" in state for i in (6, 7, 8)]
    if any(biases) and not all(biases):
        raise ValueError(f"decoder: biases on some convs only ({biases} for conv6/7/8)")
    rep.backbone, rep.num_classes, rep.num_registers, rep.embed_dim = name, k, r, d
    rep.depth, rep.patch_size, rep.grid, rep.decoder_bias = depth, patch, g, all(biases)
    config = dict(backbone=name, num_classes=k, num_registers=r, decoder_bias=rep.decoder_bias,
                  decoder_dim=int(conv6.shape[0]), img_size=img_size, **named)
    with torch.device("meta"):  # names and shapes only, no memory
        model = model_from_config(config)  # the config's own defaults (topk 0.5, published GCR score, sdpa)
    config = dict(model.config)
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            rep.dropped.append(key)
        elif key in own:
            if own[key].shape != value.shape:
                raise ValueError(f"'{key}' has shape {tuple(value.shape)}; MoReNet({name}, K={k}, R={r}) "
                                 f"expects {tuple(own[key].shape)}")
            out[key] = value
        else:
            rep.unknown.append(key)
    if rep.unknown and not ignore_unknown:
        raise ValueError(f"{len(rep.unknown)} tensors have no place in MoReNet: {rep.unknown[:10]}"
                         f"{' ...' if len(rep.unknown) > 10 else ''} (pass ignore_unknown / --ignore-unknown "
                         "to drop them)")
    missing = [key for key in own if key not in out]
    if missing:
        raise ValueError(f"{len(missing)} MoReNet tensors are missing from the checkpoint: {missing[:10]}")
    return out, config, rep


def convert_file(src: str | pathlib.Path, dst: str | pathlib.Path,
                 ignore_unknown: bool = False, backbone: Optional[str] = None) -> ConversionReport:
    """Read a published checkpoint, convert it, and write {"model", "model_config", ...} atomically."""

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no such file {src}")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(src))
    else:
        obj = torch_load(src, map_location="cpu")
    state, config, rep = convert_state_dict(obj, ignore_unknown, backbone)  # every name and shape checked
    save_atomic({"model": {key: value.contiguous() for key, value in state.items()}, "model_config": config,
                 "format": FORMAT, "converted_from": src.name}, dst)
    return rep
