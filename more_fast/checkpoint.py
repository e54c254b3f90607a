"""Weights in and out: timm ViT initialization (SPEC 1) and published MoRe checkpoints (SPEC 8)."""
from __future__ import annotations

import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def read_state_dict(path: str | pathlib.Path) -> dict:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file; unwraps 'model'/'state_dict'."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path} does not hold a state dict")
    return state


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
    """Initialize a MoReBackbone from a timm ViT state dict (SPEC 1).

    All R + K tokens and their position embeddings start from the single class token; the R
    register position embeddings are re-drawn from a truncated normal; the patch position
    embeddings are kept (resized only if the checkpoint's grid differs from the backbone's).
    Returns the checkpoint keys that were not used (the classification head, for instance).
    """
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError("pretrained: expected a timm ViT state dict with 'cls_token' and 'pos_embed'")
    d = backbone.embed_dim
    cls = state["cls_token"]
    if cls.shape[-1] != d:
        raise ValueError(f"pretrained: cls_token has width {cls.shape[-1]}, the backbone {d}")
    r, k = backbone.num_registers, backbone.num_classes
    pos = state["pos_embed"]
    num_prefix = pos.shape[1] - _square_part(pos.shape[1])
    backbone.cls_token.copy_(cls[:, :1].expand(1, r + k, d))
    prefix_pos = pos[:, :1].expand(1, r + k, d).clone()
    nn.init.trunc_normal_(prefix_pos[:, :r], std=0.02)
    patch_pos = _resize_patch_pos(pos[:, num_prefix:], backbone.pos_grid)
    backbone.pos_embed.copy_(torch.cat([prefix_pos, patch_pos], dim=1))
    own = backbone.state_dict()
    rest = {key: val for key, val in state.items() if key in own and key not in ("cls_token", "pos_embed")}
    missing = [key for key in own if key not in rest and key not in ("cls_token", "pos_embed")]
    if missing:
        raise ValueError(f"pretrained: the checkpoint lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")
    for key, val in rest.items():
        if own[key].shape != val.shape:
            raise ValueError(f"pretrained: {key} has shape {tuple(val.shape)}, the backbone {tuple(own[key].shape)}")
    backbone.load_state_dict({**own, **rest}, strict=True)
    return sorted(key for key in state if key not in rest and key not in ("cls_token", "pos_embed"))


def _square_part(n: int) -> int:
    """The largest perfect square <= n, i.e. the patch positions of a [prefix | G*G] pos_embed."""
    side = int(n ** 0.5)
    while side * side > n:
        side -= 1
    return side * side
