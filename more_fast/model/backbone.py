"""The MoRe backbone: a timm ViT whose single class token becomes R registers + K class tokens.

Token layout (SPEC 1): [R register tokens | K class tokens | N patch tokens]. Registers take
part in attention only. Patch position embeddings stay at the pretrained grid and are resized
bicubically to the input grid on the fly, so any input whose sides are multiples of 16 works.
Every block runs on F.scaled_dot_product_attention (`attn_impl="sdpa"`); `attn_impl="explicit"`
materializes the attention as the published code does (the baseline of the benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

ATTN_IMPLS = ("sdpa", "explicit")
CPA_REDUCES = ("mean_softmax", "sum_logits")


@dataclass
class BackboneOutput:
    class_tokens: torch.Tensor  # B x K x D, after the final norm
    patch_tokens: torch.Tensor  # B x N x D, after the final norm
    aux_patch_tokens: torch.Tensor  # B x N x D, output of block `aux_layer`, before any norm
    grid: tuple[int, int]  # (h, w) patch grid
    class_patch_attn: Optional[torch.Tensor] = None  # B x K x N, last block, detached


def _attention_with_qk(attn: nn.Module, x: torch.Tensor, impl: str):
    """timm Attention forward that also returns q and k (B x heads x T x d)."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each B x heads x T x d
    q, k = attn.q_norm(q), attn.k_norm(k)
    if impl == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B x heads x T x T
        o = weights @ v
    o = o.transpose(1, 2).reshape(b, t, -1)  # B x T x (heads * d)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        o = norm(o)
    return attn.proj_drop(attn.proj(o)), q, k


def _block_forward(block: nn.Module, x: torch.Tensor, impl: str):
    o, q, k = _attention_with_qk(block.attn, block.norm1(x), impl)
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, q, k


class MoReBackbone(nn.Module):
    """A timm ViT with R register tokens and K class tokens (SPEC 1).

    Args:
        name: any timm ViT name with a patch embedding and `blocks` (e.g. vit_base_patch16_224).
        num_classes: K, one token per class.
        num_registers: R, extra tokens that only take part in attention.
        aux_layer: index of the block whose output gives the auxiliary patch tokens (-3).
        attn_impl: "sdpa" (fused attention) or "explicit" (the published way).
        img_size: the pretrained grid size in pixels (the position embedding grid).
        depth: override the number of blocks of the named model (None keeps it).
        patch_size: override the patch size of the named model (None keeps it).
    """

    def __init__(self, name: str = "vit_base_patch16_224", num_classes: int = 20, num_registers: int = 4,
                 aux_layer: int = -3, attn_impl: str = "sdpa", img_size: Optional[int] = None,
                 depth: Optional[int] = None, patch_size: Optional[int] = None):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        extra = {} if img_size is None else {"img_size": img_size}
        if depth is not None:  # fewer blocks than the named model: small CPU runs and tests
            extra["depth"] = depth
        if patch_size is not None:  # a finer grid than the named model's (small images, no pretrained weights)
            extra["patch_size"] = patch_size
        try:
            vit = timm.create_model(name, pretrained=False, num_classes=0, drop_rate=0.0,
                                    drop_path_rate=0.0, **extra)
        except RuntimeError as err:
            raise ValueError(f"backbone: unknown timm model {name!r} ({err})") from None
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed") or getattr(vit, "cls_token", None) is None:
            raise ValueError(f"backbone: {name!r} is not a ViT with a class token and blocks")
        self.name = name
        self.num_classes = num_classes
        self.num_registers = num_registers
        self.num_prefix_pretrained = getattr(vit, "num_prefix_tokens", 1)
        self.attn_impl = attn_impl
        self.aux_layer = aux_layer % len(vit.blocks)
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.patch_embed = vit.patch_embed
        self.patch_embed.strict_img_size = False
        self.blocks = vit.blocks
        for block in self.blocks:  # timm's own switch between SDPA and explicit attention
            block.attn.fused_attn = attn_impl == "sdpa"
        self.norm = vit.norm
        grid = vit.patch_embed.grid_size
        self.pos_grid = (int(grid[0]), int(grid[1]))
        d = self.embed_dim
        # all R + K tokens start as copies of the (pretrained) class token and its position embedding
        cls = vit.cls_token.detach()  # 1 x 1 x D
        cls_pos = vit.pos_embed.detach()[:, :1]  # 1 x 1 x D
        self.cls_token = nn.Parameter(cls.expand(1, num_registers + num_classes, d).clone())
        prefix_pos = cls_pos.expand(1, num_registers + num_classes, d).clone()
        nn.init.trunc_normal_(prefix_pos[:, :num_registers])  # timm defaults (std 1, +-2), as published
        patch_pos = vit.pos_embed.detach()[:, self.num_prefix_pretrained:]  # 1 x G*G x D
        self.pos_embed = nn.Parameter(torch.cat([prefix_pos, patch_pos], dim=1))

    @property
    def num_prefix(self) -> int:
        return self.num_registers + self.num_classes

    def load_pretrained_vit(self, state_dict: dict) -> list[str]:
        """Initialize from a timm ViT state dict per SPEC 1; returns the keys that were not used."""
        from ..checkpoint import init_from_timm_state

        return init_from_timm_state(self, state_dict)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """1 x (R+K+h*w) x D: the patch part resized bicubically from the pretrained grid."""
        prefix = self.pos_embed[:, : self.num_prefix]
        patch = self.pos_embed[:, self.num_prefix:]
        gh, gw = self.pos_grid
        if (h, w) != (gh, gw):
            patch = patch.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # 1 x D x gh x gw
            # as the published code (DINO's interpolate_pos_encoding): a scale factor with +0.1 so that
            # flooring lands on (h, w); the factor, not the size, sets the sampling positions
            patch = F.interpolate(patch, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                                  align_corners=False)
            patch = patch[:, :, :h, :w].permute(0, 2, 3, 1).reshape(1, h * w, -1)  # 1 x hw x D
        return torch.cat([prefix, patch], dim=1)

    def forward(self, x: torch.Tensor, attn_reduce: Optional[str] = None) -> BackboneOutput:
        """x: B x 3 x H x W (normalized). attn_reduce: also return the last block's class-patch
        attention, reduced over heads ("mean_softmax" or "sum_logits"); the blocks stay on SDPA."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected B x 3 x H x W, got shape {tuple(x.shape)}")
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ValueError(f"x: expected H and W >= {self.patch_size}, got {tuple(x.shape[-2:])}")
        if attn_reduce is not None and attn_reduce not in CPA_REDUCES:
            raise ValueError(f"attn_reduce: expected one of {CPA_REDUCES} or None, got {attn_reduce!r}")
        b = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.patch_embed(x)  # B x hw x D
        if patches.dim() == 4:  # timm NHWC output format
            patches = patches.flatten(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1) + self._pos_embed(h, w)
        aux = None
        cpa = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last and attn_reduce is not None:
                tokens, q, k = _block_forward(block, tokens, self.attn_impl)
                cpa = kernels.class_patch_attention(q.detach(), k.detach(), self.num_registers,
                                                    self.num_classes, attn_reduce)
            else:
                tokens = block(tokens)
            if i == self.aux_layer:
                aux = tokens[:, self.num_prefix:]
        tokens = self.norm(tokens)
        return BackboneOutput(
            class_tokens=tokens[:, self.num_registers: self.num_prefix],
            patch_tokens=tokens[:, self.num_prefix:],
            aux_patch_tokens=aux,
            grid=(h, w),
            class_patch_attn=cpa,
        )
