"""The MoRe backbone: a timm ViT whose single class token becomes R registers + K class tokens.

Token layout: [R register tokens | M timm register tokens | K class tokens | N patch tokens].
R and K are MoRe's; M is the named model's own register count (4 for the *_reg4_* DINOv2
models, 0 for most) and those tokens are kept as they are, counted apart from R. Registers of
both kinds take part in attention only. Patch position embeddings stay at the pretrained grid
and are resized bicubically to the input grid on the fly, so any input whose sides are multiples
of the patch size (14 or 16) works. Every block runs on F.scaled_dot_product_attention
(`attn_impl="sdpa"`); `attn_impl="explicit"` materializes the attention as the published code
does (the baseline of the benchmarks).

The timm families and how each hosts the extra prefix tokens:
- ViT / DeiT / CLIP / DINOv2: the R + K tokens start as copies of the class token and its
  position embedding. Position embeddings without a class-token entry (`no_embed_class`:
  DeiT-III, DINOv2 with registers) give the class tokens a zero position embedding, which is
  what such a model adds to its class token. A pre-norm (`norm_pre`, CLIP) runs before the blocks.
- No class token (SigLIP): the R + K tokens start from the mean patch token, the patch
  embedding of an all-zero (normalized: the data mean) image, since the patch embedding is
  linear and normalized images average to zero; their position embedding starts from the mean
  patch position embedding. The attention-pool ('map') head is not used.
- Relative position bias (BEiT): every prefix token uses the class token's three bias entries
  (prefix to patch, patch to prefix, prefix to prefix). Patch-to-patch distances index the
  pretrained table; distances beyond its window reuse its outermost entries (clamped), so the
  table keeps its shape and its gradient at every input size. The bias goes to SDPA as an
  additive mask of heads x T x T (batch-independent): no attention weights are materialized.
- Rotary embeddings (EVA-02): patch queries and keys are rotated for the input grid; prefix
  tokens are not rotated.
- Models that pool by averaging (BEiT, EVA-02: `norm` is Identity and `fc_norm` normalizes the
  pooled token) apply that `fc_norm` to every token as the final norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, trunc_normal_
from timm.layers.attention import Attention as VitAttention
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block as VitBlock

import kernels

from ..io import strip_prefixes
from .pretrained import init_from_timm_state, matching_tensors
from .published import ATTN_IMPL, NUM_REGISTERS

ATTN_IMPLS = ("sdpa", "explicit")
CPA_REDUCES = ("mean_softmax", "sum_logits")
BLOCKS = {VitBlock: VitAttention, BeitBlock: BeitAttention, EvaBlock: EvaAttention}


@dataclass
class BackboneOutput:
    class_tokens: torch.Tensor  # B x K x D, after the final norm
    patch_tokens: torch.Tensor  # B x N x D, after the final norm
    aux_patch_tokens: torch.Tensor  # B x N x D, output of block `aux_layer`, before any norm
    grid: tuple[int, int]  # (h, w) patch grid
    class_patch_attn: Optional[torch.Tensor] = None  # B x K x N, last block, detached


def timm_patch_size(name: str) -> int:
    """The patch size of a timm model, read from a weightless (meta device) instance."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise ValueError(f"backbone: {name!r} has no patch embedding (not a ViT)")
    return int(embed.patch_size[0])


def _refusal(name: str, vit: nn.Module) -> Optional[str]:
    """Why the timm model `name` cannot host MoRe's prefix tokens here (None: it can)."""
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        return "it is not a ViT with a patch embedding and a list of blocks"
    for block in vit.blocks:
        attn_type = BLOCKS.get(type(block))
        if attn_type is None:
            return (f"its blocks ({type(block).__module__}.{type(block).__name__}) are not token-sequence blocks "
                    "this adapter can extend (timm's ViT, BEiT and EVA blocks)")
        if type(block.attn) is not attn_type:
            return f"its {type(block.attn).__name__} attention is not one this adapter runs"
    rope = getattr(vit, "rope", None)
    if rope is not None and (getattr(vit, "rope_mixed", False) or not hasattr(rope, "get_embed")
                             or type(rope).__name__ != "RotaryEmbeddingCat"):
        return f"its {type(rope).__name__} rotary embedding is not the axial one (EVA-02's) this adapter applies"
    if getattr(vit, "pos_embed", None) is None and rope is None and not _has_rel_pos(vit):
        return "it has no position information this adapter can extend (no absolute, relative or rotary one)"
    return None


def _has_rel_pos(vit: nn.Module) -> bool:
    return getattr(vit, "rel_pos_bias", None) is not None or any(
        getattr(b.attn, "relative_position_bias_table", None) is not None for b in vit.blocks)


def rel_pos_index(window: tuple[int, int], grid: tuple[int, int], num_prefix: int,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """(P + h*w) x (P + h*w) indices into a BEiT bias table built for `window` (+3 prefix entries).

    Patch pairs index their (query - key) distance, clamped to the table's window; the P prefix
    tokens all use the class token's entries: n-3 prefix to patch, n-2 patch to prefix, n-1
    prefix to prefix (n, the table's length). At P = 1 and grid = window: timm's own index."""
    (wh, ww), (h, w) = window, grid
    n = (2 * wh - 1) * (2 * ww - 1) + 3
    ys = torch.arange(h, device=device).repeat_interleave(w)  # h*w, row of each patch
    xs = torch.arange(w, device=device).repeat(h)
    dy = (ys[:, None] - ys[None, :]).clamp(-(wh - 1), wh - 1) + (wh - 1)
    dx = (xs[:, None] - xs[None, :]).clamp(-(ww - 1), ww - 1) + (ww - 1)
    patch = dy * (2 * ww - 1) + dx  # hw x hw
    t = num_prefix + h * w
    index = torch.full((t, t), n - 1, dtype=torch.long, device=device)
    index[:num_prefix, num_prefix:] = n - 3
    index[num_prefix:, :num_prefix] = n - 2
    index[num_prefix:, num_prefix:] = patch
    return index


def _rel_pos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table n x heads, index T x T -> heads x T x T."""
    t = index.shape[0]
    return table[index.reshape(-1)].reshape(t, t, -1).permute(2, 0, 1)


def _qkv(attn: nn.Module, x: torch.Tensor):
    """q, k, v (each B x heads x T x d) of a timm ViT, BEiT or EVA attention."""
    b, t, _ = x.shape
    if getattr(attn, "qkv", None) is None:  # EVA with separate projections
        q, k, v = (proj(x).reshape(b, t, attn.num_heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    else:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:  # BEiT / EVA: a learned q and v bias, k's fixed at zero
            qkv = F.linear(x, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return q, k, v


def _attention_with_qk(attn: nn.Module, x: torch.Tensor, impl: str, num_prefix: int,
                       rope: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
    """The attention of a timm ViT / BEiT / EVA block, also returning q and k (B x heads x T x d)
    as the attention uses them (rotated, for EVA). bias: heads x T x T, added to the logits."""
    b, t, _ = x.shape
    q, k, v = _qkv(attn, x)
    if rope is not None:  # the prefix tokens have no grid position: not rotated
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :num_prefix], apply_rot_embed_cat(q[:, :, num_prefix:], rope, half=half)], 2).type_as(v)
        k = torch.cat([k[:, :, :num_prefix], apply_rot_embed_cat(k[:, :, num_prefix:], rope, half=half)], 2).type_as(v)
    mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)
    if impl == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # B x heads x T x T
        if mask is not None:
            logits = logits + mask
        o = logits.softmax(dim=-1) @ v
    o = o.transpose(1, 2).reshape(b, t, -1)  # B x T x (heads * d)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(o)), q, k


def _layer_scale(block: nn.Module, i: int, y: torch.Tensor) -> torch.Tensor:
    ls = getattr(block, f"ls{i}", None)  # timm ViT: LayerScale or Identity
    if ls is not None:
        return ls(y)
    gamma = getattr(block, f"gamma_{i}", None)  # BEiT / EVA: a parameter or None
    return y if gamma is None else gamma * y


def _block_forward(block: nn.Module, x: torch.Tensor, impl: str, num_prefix: int = 1,
                   rope: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
    o, q, k = _attention_with_qk(block.attn, block.norm1(x), impl, num_prefix, rope, bias)
    x = x + block.drop_path1(_layer_scale(block, 1, o))
    x = x + block.drop_path2(_layer_scale(block, 2, block.mlp(block.norm2(x))))
    return x, q, k


def _biased_class_patch_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, first_cls: int,
                                  num_cls: int) -> torch.Tensor:
    """mean over heads of softmax(q k^T / sqrt(d) + bias) for the class-token rows, patch columns:
    B x K x N. Only the K class rows are formed (B x heads x K x T), never T x T."""
    first_patch = first_cls + num_cls
    qc = q[:, :, first_cls:first_patch].float()
    logits = (qc @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias[:, first_cls:first_patch].float()
    return logits.softmax(dim=-1)[..., first_patch:].mean(dim=1)


class MoReBackbone(nn.Module):
    """A timm ViT with R register tokens and K class tokens.

    Args:
        name: a timm ViT name of the families listed in the module docstring (e.g.
            vit_base_patch16_224, vit_small_patch14_reg4_dinov2, deit3_small_patch16_224,
            vit_base_patch16_clip_224, vit_base_patch16_siglip_224, beit_base_patch16_224,
            eva02_tiny_patch14_224). Others raise a ValueError naming the reason.
        num_classes: K, one token per class.
        num_registers: R, extra tokens that only take part in attention (the model's own
            registers, if it has any, come on top: `num_timm_registers`).
        aux_layer: index of the block whose output gives the auxiliary patch tokens (-3).
        attn_impl: "sdpa" (fused attention) or "explicit" (the published way).
        img_size: the pretrained grid size in pixels (the position embedding grid).
        depth: override the number of blocks of the named model (None keeps it).
        patch_size: override the patch size of the named model (None keeps it).
    """

    def __init__(self, name: str, num_classes: int, num_registers: int = NUM_REGISTERS,
                 aux_layer: int = -3, attn_impl: str = ATTN_IMPL, img_size: Optional[int] = None,
                 depth: Optional[int] = None, patch_size: Optional[int] = None):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        if num_registers < 0:
            raise ValueError(f"num_registers: expected >= 0, got {num_registers}")
        extra = {} if img_size is None else {"img_size": img_size}
        if depth is not None:  # fewer blocks than the named model: small CPU runs and tests
            extra["depth"] = depth
        if patch_size is not None:  # a finer grid than the named model's (small images, no pretrained weights)
            extra["patch_size"] = patch_size
        try:
            if timm.is_model(name) and timm.models.model_entrypoint(name).__module__.endswith(".eva"):
                extra["dynamic_img_size"] = True  # EVA's rotary embedding then follows the input grid
            vit = timm.create_model(name, pretrained=False, num_classes=0, drop_rate=0.0,
                                    drop_path_rate=0.0, **extra)
        except RuntimeError as err:
            raise ValueError(f"backbone: unknown timm model {name!r} ({err})") from None
        except TypeError as err:  # a model family without the ViT arguments (depth, img_size, ...)
            raise ValueError(f"backbone: {name!r} is not a ViT this adapter builds ({err})") from None
        why = _refusal(name, vit)
        if why is not None:
            raise ValueError(f"backbone: {name!r} cannot host MoRe's register and class tokens: {why}")
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
        norm_pre = getattr(vit, "norm_pre", None)
        self.norm_pre = nn.Identity() if norm_pre is None else norm_pre
        self.blocks = vit.blocks
        for block in self.blocks:  # timm's own switch, for any code that calls the blocks directly
            block.attn.fused_attn = attn_impl == "sdpa"
        norm, fc_norm = vit.norm, getattr(vit, "fc_norm", None)
        self.uses_fc_norm = (isinstance(norm, nn.Identity) and fc_norm is not None
                             and not isinstance(fc_norm, nn.Identity))
        self.norm = fc_norm if self.uses_fc_norm else norm
        self.rope = getattr(vit, "rope", None)
        self.rel_pos_bias = getattr(vit, "rel_pos_bias", None)  # BEiT's shared table, if any
        self.has_rel_pos = _has_rel_pos(vit)
        grid = vit.patch_embed.grid_size
        self.pos_grid = (int(grid[0]), int(grid[1]))
        d = self.embed_dim
        has_cls = getattr(vit, "cls_token", None) is not None
        self.has_class_token = has_cls
        pos = vit.pos_embed.detach() if getattr(vit, "pos_embed", None) is not None else None
        self.has_patch_pos = pos is not None
        # the pos_embed entries before the patches: the class token's and timm registers' unless no_embed_class
        pos_prefix = 0 if pos is None or getattr(vit, "no_embed_class", False) else self.num_prefix_pretrained
        patch_pos = None if pos is None else pos[:, pos_prefix:]  # 1 x G*G x D
        reg = getattr(vit, "reg_token", None)
        self.num_timm_registers = 0 if reg is None else int(reg.shape[1])
        if reg is not None:
            reg = reg.detach().clone()
            if pos_prefix:  # a token and its fixed position embedding are one constant: fold them
                first = 1 if has_cls else 0
                reg = reg + pos[:, first:first + self.num_timm_registers]
            self.reg_token = nn.Parameter(reg)
        else:
            self.reg_token = None
        # all R + K tokens start as copies of the (pretrained) class token and its position embedding
        n = num_registers + num_classes
        if has_cls:
            cls = vit.cls_token.detach()  # 1 x 1 x D
            cls_pos = pos[:, :1] if pos_prefix else torch.zeros_like(cls)
        else:  # SigLIP: the mean patch token at the mean patch position
            cls = self._mean_patch_token()
            cls_pos = patch_pos.mean(dim=1, keepdim=True) if patch_pos is not None else torch.zeros_like(cls)
        self.cls_token = nn.Parameter(cls.expand(1, n, d).clone())
        prefix_pos = cls_pos.expand(1, n, d).clone()
        trunc_normal_(prefix_pos[:, :num_registers])  # timm's defaults: std 1, cut at +-2 (as published)
        parts = [prefix_pos] if patch_pos is None else [prefix_pos, patch_pos]
        self.pos_embed = nn.Parameter(torch.cat(parts, dim=1))
        for block in self.blocks:  # EVA's own blocks leave this many leading tokens unrotated
            if hasattr(block.attn, "num_prefix_tokens"):
                block.attn.num_prefix_tokens = self.num_prefix

    @property
    def num_prefix(self) -> int:
        """Every token before the patches: R + M (timm's own registers) + K."""
        return self.num_registers + self.num_timm_registers + self.num_classes

    @torch.no_grad()
    def _mean_patch_token(self) -> torch.Tensor:
        """1 x 1 x D: the patch embedding of one all-zero patch (a normalized image's mean)."""
        w = self.patch_embed.proj.weight
        tokens = self.patch_embed(w.new_zeros(1, 3, self.patch_size, self.patch_size))
        return tokens.reshape(1, -1, tokens.shape[-1])[:, :1].detach().clone()

    def load_pretrained_vit(self, state_dict: dict) -> list[str]:
        """Initialize from a timm state dict of the same family; returns the keys that were not used.

        Families with a class token and absolute position embeddings go through
        `more_fast.model.pretrained.init_from_timm_state`; a model without a class token (SigLIP) or
        without absolute position embeddings (BEiT) is initialized here the same way, its class
        tokens as described in the module docstring. An fc_norm used as the final norm is read
        from the checkpoint's `fc_norm.*`."""

        state = strip_prefixes(state_dict)
        if self.uses_fc_norm:
            state = {("norm." + key[len("fc_norm."):] if key.startswith("fc_norm.") else key): value
                     for key, value in state.items() if not key.startswith("norm.")}
        if self.reg_token is not None and "reg_token" in state and "pos_embed" in state:
            state = self._fold_register_pos(state)
        if not self.has_patch_pos:
            return self._load_without_pos_embed(state)
        if not self.has_class_token:
            if "cls_token" in state:
                raise ValueError(f"pretrained: the checkpoint has a class token; the backbone {self.name} has none")
            pos = state.get("pos_embed")
            if pos is None or pos.dim() != 3:
                raise ValueError(f"pretrained: expected a timm ViT state dict with 'pos_embed' for {self.name}")
            placeholder = pos.new_zeros(1, 1, pos.shape[-1])  # replaced by the mean patch token below
            state = {**state, "cls_token": placeholder,
                     "pos_embed": torch.cat([pos.mean(dim=1, keepdim=True), pos], dim=1)}
            unused = init_from_timm_state(self, state)
            with torch.no_grad():
                self.cls_token.copy_(self._mean_patch_token().expand_as(self.cls_token))
            return unused
        return init_from_timm_state(self, state)

    def _fold_register_pos(self, state: dict) -> dict:
        """timm registers with position embeddings of their own: folded into the tokens, as at build."""
        pos, reg = state["pos_embed"], state["reg_token"]
        m = reg.shape[1]
        first = 1 if self.has_class_token else 0
        n_patch = self.pos_grid[0] * self.pos_grid[1]
        if pos.shape[1] == first + m + n_patch:  # pos_embed holds [class | registers | patches]
            state = {**state, "reg_token": reg + pos[:, first:first + m],
                     "pos_embed": torch.cat([pos[:, :first], pos[:, first + m:]], dim=1)}
        return state

    @torch.no_grad()
    def _load_without_pos_embed(self, state: dict) -> list[str]:
        """BEiT-like models: class token copies with no position embedding; every other tensor as is."""
        if "cls_token" not in state:
            raise ValueError(f"pretrained: expected a timm state dict with 'cls_token' for {self.name}")
        d = self.embed_dim
        cls = state["cls_token"]
        if cls.dim() != 3 or cls.shape[0] != 1 or cls.shape[-1] != d:
            raise ValueError(f"pretrained: cls_token has shape {tuple(cls.shape)}; the backbone "
                             f"{self.name} expects 1 x 1 x {d} (width {d})")
        own = self.state_dict()
        skip = ("cls_token", "pos_embed")
        rest = matching_tensors(self, own, state)
        r = self.num_registers
        prefix_pos = torch.zeros_like(self.pos_embed)  # BEiT adds no position embedding to its class token
        trunc_normal_(prefix_pos[:, :r])  # timm's defaults: std 1, cut at +-2 (as published)
        self.load_state_dict({**own, **rest, "cls_token": cls[:, :1].expand_as(self.cls_token).clone(),
                              "pos_embed": prefix_pos}, strict=True)
        return sorted(key for key in state if key not in rest and key not in skip)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """1 x (R+K+h*w) x D: the patch part resized bicubically from the pretrained grid
        (1 x (R+K) x D for a model without absolute position embeddings)."""
        n = self.num_registers + self.num_classes
        prefix = self.pos_embed[:, :n]
        if not self.has_patch_pos:
            return prefix
        patch = self.pos_embed[:, n:]
        gh, gw = self.pos_grid
        if (h, w) != (gh, gw):
            patch = patch.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # 1 x D x gh x gw
            # as the published code (DINO's interpolate_pos_encoding): a scale factor with +0.1 so that
            # flooring lands on (h, w); the factor, not the size, sets the sampling positions
            patch = F.interpolate(patch, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                                  align_corners=False)
            patch = patch[:, :, :h, :w].permute(0, 2, 3, 1).reshape(1, h * w, -1)  # 1 x hw x D
        return torch.cat([prefix, patch], dim=1)

    def _bias(self, block: nn.Module, index: torch.Tensor) -> Optional[torch.Tensor]:
        table = getattr(block.attn, "relative_position_bias_table", None)
        bias = None if table is None else _rel_pos_bias(table, index)
        if self.rel_pos_bias is not None:
            shared = _rel_pos_bias(self.rel_pos_bias.relative_position_bias_table, index)
            bias = shared if bias is None else bias + shared
        return bias

    def forward(self, x: torch.Tensor, attn_reduce: Optional[str] = None) -> BackboneOutput:
        """x: B x 3 x H x W (normalized). attn_reduce: also return the last block's class-patch
        attention, reduced over heads ("mean_softmax" or "sum_logits"); the blocks stay on SDPA."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected B x 3 x H x W, got shape {tuple(x.shape)}")
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ValueError(f"x: expected H and W >= {self.patch_size}, got {tuple(x.shape[-2:])}")
        if attn_reduce is not None and attn_reduce not in CPA_REDUCES:
            raise ValueError(f"attn_reduce: expected one of {CPA_REDUCES} or None, got {attn_reduce!r}")
        if attn_reduce == "sum_logits" and self.has_rel_pos:
            raise ValueError(f"attn_reduce: 'sum_logits' (the raw q.k score map) would leave out the relative "
                             f"position bias of {self.name}'s attention; use 'mean_softmax'")
        b = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.patch_embed(x)  # B x hw x D
        if patches.dim() == 4:  # timm NHWC output format
            patches = patches.flatten(1, 2)
        pos = self._pos_embed(h, w)
        r, first_cls = self.num_registers, self.num_registers + self.num_timm_registers
        n = r + self.num_classes
        if self.has_patch_pos:
            patches = patches + pos[:, n:]
        prefix = (self.cls_token + pos[:, :n]).expand(b, -1, -1)
        parts = [prefix[:, :r]]
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(b, -1, -1))
        tokens = self.norm_pre(torch.cat(parts + [prefix[:, r:], patches], dim=1))
        p = self.num_prefix
        rope = None if self.rope is None else self.rope.get_embed(shape=[h, w])
        index = rel_pos_index(self.pos_grid, (h, w), p, x.device) if self.has_rel_pos else None
        aux = None
        cpa = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            bias = None if index is None else self._bias(block, index)
            if bias is None and not (i == last and attn_reduce is not None):  # timm's own block forward
                tokens = block(tokens) if rope is None else block(tokens, rope=rope)
            else:
                tokens, q, k = _block_forward(block, tokens, self.attn_impl, p, rope, bias)
            if i == last and attn_reduce is not None:
                if bias is not None:
                    cpa = _biased_class_patch_attention(q.detach(), k.detach(), bias.detach(), first_cls,
                                                        self.num_classes)
                else:
                    cpa = kernels.class_patch_attention(q.detach(), k.detach(), first_cls, self.num_classes,
                                                        attn_reduce)
            if i == self.aux_layer:
                aux = tokens[:, p:]
        tokens = self.norm(tokens)
        return BackboneOutput(
            class_tokens=tokens[:, first_cls: p],
            patch_tokens=tokens[:, p:],
            aux_patch_tokens=aux,
            grid=(h, w),
            class_patch_attn=cpa,
        )
