"""Backbone weights from timm: `--pretrained` (a local file or `timm:<tag>`) and the set-up of a
MoReBackbone from a timm ViT state dict (docs/METHOD.md, "Network")."""
from __future__ import annotations

import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import read_state_dict, strip_prefixes

TIMM_PREFIX = "timm:"
# The published runs start from the original ViT-B/16 weights, jx_vit_base_p16_224-80ecf9dd.pth;
# timm serves the same weights under this tag (its plain vit_base_patch16_224 is an augreg checkpoint).
PUBLISHED_PRETRAINED = "vit_base_patch16_224.orig_in21k_ft_in1k"
PUBLISHED_PRETRAINED_FILE = "jx_vit_base_p16_224-80ecf9dd.pth"


def _offline_hint(tag: str, why: str) -> str:
    return (f"pretrained: timm:{tag} cannot be fetched ({why}); offline, pass a local file instead: "
            f"--pretrained path/to/weights.pth or .safetensors (timm's file of {tag}"
            + (f", or the published {PUBLISHED_PRETRAINED_FILE}" if tag == PUBLISHED_PRETRAINED else "") + ")")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (a name lookup fails at once offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_cached_file(tag: str) -> str | None:
    """The local Hugging Face cache's copy of a timm tag's weights, if there is one."""
    import timm

    cfg = timm.models.get_pretrained_cfg(tag)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def check_pretrained(spec: str) -> None:
    """Fail early, with one line, for a `--pretrained` that cannot be loaded: a missing local file,
    an unknown timm tag, or a `timm:<tag>` whose weights are neither cached nor reachable."""
    if not spec.startswith(TIMM_PREFIX):
        if not pathlib.Path(spec).is_file():
            raise ValueError(f"pretrained: no such file {spec} (expected a local .pth/.safetensors file "
                             f"or {TIMM_PREFIX}<tag>, e.g. {TIMM_PREFIX}{PUBLISHED_PRETRAINED})")
        return
    import timm

    tag = spec[len(TIMM_PREFIX):]
    if not tag or tag not in timm.list_pretrained(tag):
        raise ValueError(f"pretrained: timm has no pretrained weights tagged {tag!r} "
                         f"(see timm.list_pretrained('vit_*'); the published runs use {PUBLISHED_PRETRAINED})")
    if _timm_cached_file(tag) is None and not _hub_reachable():
        raise ValueError(_offline_hint(tag, "no network and no cached copy"))


def pretrained_state_dict(spec: str) -> dict:
    """The state dict named by `--pretrained`: a local .pth/.pt/.bin/.safetensors file (timm's, or
    the published jx_vit_base_p16_224-80ecf9dd.pth), or `timm:<tag>`, which timm fetches (or
    reads from the local Hugging Face cache)."""
    if not spec.startswith(TIMM_PREFIX):
        return read_state_dict(spec)
    import timm

    check_pretrained(spec)
    tag = spec[len(TIMM_PREFIX):]
    cached = _timm_cached_file(tag)
    overlay = {"file": cached} if cached else None  # no network round trip when the cache has it
    try:
        model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as err:  # network, hub or file errors: one line, with the offline alternative
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(_offline_hint(tag, f"{type(err).__name__}: {first}")) from None
    return strip_prefixes(model.state_dict())


def _resize_patch_pos(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """1 x G*G x D at the checkpoint's square grid -> 1 x h*w x D (bicubic)."""
    n, d = patch_pos.shape[1:]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"pos_embed: expected a square patch grid, got {n} patch positions")
    if (side, side) == tuple(grid):
        return patch_pos
    x = patch_pos.reshape(1, side, side, d).permute(0, 3, 1, 2)  # 1 x D x G x G
    x = F.interpolate(x.float(), size=grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(patch_pos.dtype)


@torch.no_grad()
def init_from_timm_state(backbone: nn.Module, state: dict) -> list[str]:
    """Initialize a MoReBackbone from a timm ViT state dict (docs/METHOD.md, Network).

    All R + K tokens start as copies of the single class token, and their position embeddings as
    copies of the class token's; the R register position embeddings are then re-drawn from a
    truncated normal at timm's defaults (std 1, cut at +-2). The patch position embeddings are
    kept (resized bicubically only if the checkpoint's grid differs from the backbone's). A
    checkpoint whose pos_embed has no class-token entry (timm `no_embed_class` models) gives the
    class tokens zero position embeddings, which is what such a model adds to its class token.
    Blocks, patch embedding and final norm are copied as they are. Returns the checkpoint keys
    that were not used (the classification head, for instance). Raises ValueError naming the
    problem for a checkpoint that is not a matching timm ViT (missing tensors, another width,
    another patch size).
    """
    state = strip_prefixes(state)
    if "cls_token" not in state or "pos_embed" not in state:
        hint = ""
        if any(key.startswith("encoder.") for key in state):
            hint = (" (this looks like a MoRe checkpoint, backbone under 'encoder.': load it with "
                    "more_fast.load_model, or convert a published one with scripts/convert_checkpoint.py)")
        raise ValueError("pretrained: expected a timm ViT state dict with 'cls_token' and 'pos_embed'" + hint)
    d = backbone.embed_dim
    cls, pos = state["cls_token"], state["pos_embed"]
    if cls.dim() != 3 or cls.shape[0] != 1 or cls.shape[-1] != d:
        raise ValueError(f"pretrained: cls_token has shape {tuple(cls.shape)}; the backbone "
                         f"{backbone.name} expects 1 x 1 x {d} (width {d})")
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[-1] != d:
        raise ValueError(f"pretrained: pos_embed has shape {tuple(pos.shape)}; the backbone "
                         f"{backbone.name} expects 1 x T x {d} (width {d})")
    r, k = backbone.num_registers, backbone.num_classes
    num_prefix = pos.shape[1] - _square_part(pos.shape[1])
    backbone.cls_token.copy_(cls[:, :1].expand(1, r + k, d))
    if num_prefix > 0:
        prefix_pos = pos[:, :1].expand(1, r + k, d).clone()
    else:  # no_embed_class: the class token gets no position embedding
        prefix_pos = pos.new_zeros(1, r + k, d)
    # timm's defaults (std 1, cut at +-2), as the published mat_vit.py: with a small std the
    # registers would start as near-copies of the class tokens
    nn.init.trunc_normal_(prefix_pos[:, :r])
    patch_pos = _resize_patch_pos(pos[:, num_prefix:], backbone.pos_grid)
    backbone.pos_embed.copy_(torch.cat([prefix_pos, patch_pos], dim=1))
    own = backbone.state_dict()
    rest = matching_tensors(backbone, own, state)
    backbone.load_state_dict({**own, **rest}, strict=True)
    return sorted(key for key in state if key not in rest and key not in _TOKEN_KEYS)


_TOKEN_KEYS = ("cls_token", "pos_embed")  # set up from the checkpoint's, never copied as they are


def matching_tensors(backbone: nn.Module, own: dict, state: dict) -> dict:
    """The checkpoint tensors that the backbone copies as they are (all but the token and position
    embeddings); ValueError naming the problem when one is missing or of another shape."""
    rest = {key: val for key, val in state.items() if key in own and key not in _TOKEN_KEYS}
    missing = [key for key in own if key not in rest and key not in _TOKEN_KEYS]
    if missing:
        raise ValueError(f"pretrained: the checkpoint lacks {len(missing)} of the {len(own) - 2} backbone "
                         f"tensors of {backbone.name}, e.g. {missing[:3]}")
    for key, val in rest.items():
        if own[key].shape != val.shape:
            raise ValueError(f"pretrained: {key} has shape {tuple(val.shape)}, the backbone "
                             f"{backbone.name} {tuple(own[key].shape)}")
    return rest


def _square_part(n: int) -> int:
    """The largest perfect square <= n, i.e. the patch positions of a [prefix | G*G] pos_embed."""
    side = int(n ** 0.5)
    while side * side > n:
        side -= 1
    return side * side
