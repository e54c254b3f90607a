"""PAR refinement (SPEC 4) as two Triton kernels: the neighbour affinity once per image, then one
launch per propagation iteration.

Math (J = 8 * len(dilations) neighbours, offsets (dy_j, dx_j) = (sy * d, sx * d) for each
dilation d and each of the 8 unit directions (sy, sx) in row-major order around the centre;
coordinates are clamped to the image = replicate padding):

    n_j(p)   = clamp(p + (dy_j, dx_j))
    std_k(p) = unbiased std over j of I_k(n_j(p))                      per image channel k
    a_j(p)   = -(1/CI) sum_k (|I_k(n_j(p)) - I_k(p)| / (std_k(p) + 1e-8) / 0.3)^2
    A_j(p)   = softmax_j(a(p))_j + 0.01 * softmax_j(-(dist_j / (std(dist) + 1e-8) / 0.3)^2)
    m_c(p)  <- sum_j A_j(p) * m_c(n_j(p))                              num_iter times

The affinity A (B x J x H x W, fp32) is computed ONCE per image and shared by every mask channel
(the two background-threshold mask sets are concatenated along C by the caller). Each iteration
is one launch over (pixel tile, channel block, image) that reads the previous masks and A and
writes the other of two ping-pong buffers, so no B x C x J x H x W tensor ever exists.

No gradient flows through PAR: the op has no autograd formula, and the public function detaches
its inputs, so the refined masks never require grad.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl
from ._launch import device_ctx as _device_ctx

__all__ = ["par_refine", "par_affinity_triton"]

_BASE_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_W1 = 0.3  # temperature of both affinities
_W2 = 0.01  # weight of the spatial affinity


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _par_affinity_kernel(
    img_ptr, dy_ptr, dx_ptr, pos_ptr, aff_ptr,
    H, W, J, CI,
    s_ib, s_ic, s_ih, s_iw,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """A[b, j, p] for one tile of BLOCK_P pixels of image b, all J neighbours at once.

    a_j(p) = -(1/CI) sum_k (|I_k(n_j(p)) - I_k(p)| / (std_k(p) + 1e-8) / 0.3)^2, std_k the
    unbiased std over the J neighbours (two-pass, in registers); A = softmax_j(a) + pos_j, pos the
    precomputed 0.01 * spatial softmax. Output fp32, contiguous B x J x HW. No gradient.
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < hw
    row = offs_p // W
    col = offs_p % W
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    dy = tl.load(dy_ptr + offs_j, mask=mask_j, other=0)
    dx = tl.load(dx_ptr + offs_j, mask=mask_j, other=0)
    nrow = tl.minimum(tl.maximum(row[None, :] + dy[:, None], 0), H - 1)
    ncol = tl.minimum(tl.maximum(col[None, :] + dx[:, None], 0), W - 1)
    nb_off = nrow.to(tl.int64) * s_ih + ncol.to(tl.int64) * s_iw  # BLOCK_J x BLOCK_P
    ctr_off = row.to(tl.int64) * s_ih + col.to(tl.int64) * s_iw  # BLOCK_P
    mask2 = mask_j[:, None] & mask_p[None, :]
    base = img_ptr + b * s_ib
    inv_j = 1.0 / J
    inv_j1 = 1.0 / (J - 1)
    acc = tl.zeros([BLOCK_J, BLOCK_P], dtype=tl.float32)
    for k in range(CI):
        ch = base + k * s_ic
        x = tl.load(ch + nb_off, mask=mask2, other=0.0).to(tl.float32)
        x0 = tl.load(ch + ctr_off, mask=mask_p, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) * inv_j
        dev = tl.where(mask2, x - mean[None, :], 0.0)
        std = tl.sqrt(tl.sum(dev * dev, axis=0) * inv_j1)
        t = tl.abs(x - x0[None, :]) / (std[None, :] + 1e-8) / 0.3
        acc += t * t
    logits = tl.where(mask_j[:, None], -acc / CI, float("-inf"))
    mx = tl.max(logits, axis=0)
    e = tl.exp(logits - mx[None, :])
    soft = e / tl.sum(e, axis=0)[None, :]
    pos = tl.load(pos_ptr + offs_j, mask=mask_j, other=0.0)
    aff = soft + pos[:, None]
    out = aff_ptr + b * J * hw + offs_j.to(tl.int64)[:, None] * hw + offs_p[None, :]
    tl.store(out, aff, mask=mask2)


@triton.jit
def _par_step_kernel(
    src_ptr, aff_ptr, dy_ptr, dx_ptr, dst_ptr,
    H, W, J, C,
    s_b, s_c, s_h, s_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One propagation step for BLOCK_C channels x BLOCK_P pixels of image b:

        dst[b, c, p] = sum_j A[b, j, p] * src[b, c, n_j(p)]

    src has any strides and float dtype (the user's masks on the first step, an fp32 ping-pong
    buffer afterwards); dst is fp32 contiguous B x C x HW. Reads and writes distinct buffers, so
    programs never race. No gradient.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hw = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < hw
    row = offs_p // W
    col = offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask2 = mask_c[:, None] & mask_p[None, :]
    src = src_ptr + b * s_b + offs_c.to(tl.int64)[:, None] * s_c  # BLOCK_C x 1 pointers
    aff = aff_ptr + b * J * hw + offs_p  # advanced by HW per neighbour (64-bit pointers)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for j in range(J):
        dy = tl.load(dy_ptr + j)
        dx = tl.load(dx_ptr + j)
        nrow = tl.minimum(tl.maximum(row + dy, 0), H - 1)
        ncol = tl.minimum(tl.maximum(col + dx, 0), W - 1)
        a = tl.load(aff, mask=mask_p, other=0.0)
        aff += hw
        m = tl.load(src + (nrow.to(tl.int64) * s_h + ncol.to(tl.int64) * s_w)[None, :], mask=mask2, other=0.0)
        acc += a[None, :] * m.to(tl.float32)
    dst = dst_ptr + b * C * hw + offs_c.to(tl.int64)[:, None] * hw + offs_p[None, :]
    tl.store(dst, acc, mask=mask2)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_AFF_BLOCK_P = 64
_STEP_BLOCK_P = 128


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(sy * d, sx * d) for d in dilations for sy, sx in _BASE_OFFSETS]


def _spatial_affinity(dilations: Sequence[int]) -> list[float]:
    """0.01 * softmax_j(-(dist_j / (std(dist) + 1e-8) / 0.3)^2), in float64 on the host."""
    dist = [math.hypot(dy, dx) for dy, dx in _offsets(dilations)]
    n = len(dist)
    mean = sum(dist) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in dist) / (n - 1))
    logits = [-((d / (std + 1e-8) / _W1) ** 2) for d in dist]
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    total = sum(e)
    return [_W2 * v / total for v in e]


@functools.lru_cache(maxsize=64)
def _tables(dilations: tuple[int, ...], device: torch.device):
    """(dy, dx) int32 and the spatial term fp32, J each, cached per dilation list and device."""
    offs = _offsets(dilations)
    dy = torch.tensor([o[0] for o in offs], dtype=torch.int32, device=device)
    dx = torch.tensor([o[1] for o in offs], dtype=torch.int32, device=device)
    pos = torch.tensor(_spatial_affinity(dilations), dtype=torch.float32, device=device)
    return dy, dx, pos


def _check_int32_span(name: str, t: torch.Tensor) -> None:
    # per-image pixel and channel indices are int32 inside the kernels (bases are int64)
    if t.shape[2] * t.shape[3] >= 2**31 // 64:
        raise ValueError(f"{name}: expected H * W < {2**31 // 64}, got {t.shape[2] * t.shape[3]}")


def par_affinity_triton(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The PAR neighbour weights, B x J x H x W fp32 (the reference's `par_affinity`)."""
    b, ci, h, w = image.shape
    dil = tuple(int(d) for d in dilations)
    dy, dx, pos = _tables(dil, image.device)
    j = dy.numel()
    aff = torch.empty((b, j, h, w), dtype=torch.float32, device=image.device)
    grid = (triton.cdiv(h * w, _AFF_BLOCK_P), b)
    with _device_ctx(image):
        _par_affinity_kernel[grid](
            image, dy, dx, pos, aff,
            h, w, j, ci,
            *image.stride(),
            BLOCK_J=triton.next_power_of_2(j), BLOCK_P=_AFF_BLOCK_P,
            num_warps=4,
        )
    return aff


def _channel_block(c: int) -> int:
    """Channel block minimizing padded channel loads + affinity re-reads (one per block)."""
    best = None
    for bc in (2, 4, 8, 16, 32):
        nblk = triton.cdiv(c, bc)
        cost = (nblk * bc + nblk, -bc)
        if best is None or cost < best[0]:
            best = (cost, bc)
    return best[1]


def _par_refine_launch(image: torch.Tensor, masks: torch.Tensor, dilations: list[int], num_iter: int) -> torch.Tensor:
    _check_int32_span("image", image)
    b, c, h, w = masks.shape
    if num_iter == 0:
        out = torch.empty((b, c, h, w), dtype=torch.float32, device=masks.device)
        out.copy_(masks)
        return out
    dil = tuple(int(d) for d in dilations)
    dy, dx, _ = _tables(dil, image.device)
    j = dy.numel()
    aff = par_affinity_triton(image, dil)
    bufs = [torch.empty((b, c, h, w), dtype=torch.float32, device=masks.device)]
    if num_iter > 1:
        bufs.append(torch.empty_like(bufs[0]))
    block_c = _channel_block(c)
    grid = (triton.cdiv(h * w, _STEP_BLOCK_P), triton.cdiv(c, block_c), b)
    src = masks
    with _device_ctx(masks):
        for it in range(num_iter):
            dst = bufs[it % 2]
            _par_step_kernel[grid](
                src, aff, dy, dx, dst,
                h, w, j, c,
                *src.stride(),
                BLOCK_C=block_c, BLOCK_P=_STEP_BLOCK_P,
                num_warps=4,
            )
            src = dst
    return src


# --------------------------------------------------------------------------------------------
# torch.library registration (forward only: PAR carries no gradient)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("more_fast::par_refine", mutates_args=())
def _par_refine_op(image: torch.Tensor, masks: torch.Tensor, dilations: list[int], num_iter: int) -> torch.Tensor:
    return _par_refine_launch(image, masks, dilations, num_iter)


@_par_refine_op.register_fake
def _(image, masks, dilations, num_iter):
    return masks.new_empty(masks.shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def par_refine(
    image: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10
) -> torch.Tensor:
    """Refined masks, B x C x H x W fp32 (inputs already validated by kernels._checks).

    The outputs carry no gradient: the inputs are detached (PAR only makes pseudo labels).
    Concatenate several mask sets of the same images along C to refine them in one call; the
    affinity is computed once per image and shared by all channels.
    """
    return _par_refine_op(image.detach(), masks.detach(), [int(d) for d in dilations], int(num_iter))


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations (scripts/aot_report.py)
# --------------------------------------------------------------------------------------------
def aot_configs(case, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> list:
    """The kernels `par_refine` launches for `case` (a kernels._launch.AotCase): the fp32 image at
    case.H x case.W and 2 (K + 1) mask channels (the two background-threshold sets the caller
    concatenates), contiguous, the default dilations."""
    from ._launch import DEFAULT_STAGES, aot_kernel

    warps = 4  # both launches above pass num_warps=4
    b, h, w = case.B, case.H, case.W
    c = 2 * (case.K + 1)
    j = len(_offsets(tuple(int(d) for d in dilations)))
    shapes = f"B{b} C{c} {h}x{w} J{j}"
    block_c = _channel_block(c)
    return [
        aot_kernel("par_affinity", _par_affinity_kernel, dict(
            img_ptr="*fp32", dy_ptr="*i32", dx_ptr="*i32", pos_ptr="*fp32", aff_ptr="*fp32", H=h, W=w, J=j, CI=3,
            s_ib=3 * h * w, s_ic=h * w, s_ih=w, s_iw=1, BLOCK_J=triton.next_power_of_2(j), BLOCK_P=_AFF_BLOCK_P,
        ), warps, DEFAULT_STAGES, shapes),
        aot_kernel("par_step", _par_step_kernel, dict(
            src_ptr="*fp32", aff_ptr="*fp32", dy_ptr="*i32", dx_ptr="*i32", dst_ptr="*fp32", H=h, W=w, J=j, C=c,
            s_b=c * h * w, s_c=h * w, s_h=w, s_w=1, BLOCK_C=block_c, BLOCK_P=_STEP_BLOCK_P,
        ), warps, DEFAULT_STAGES, shapes),
    ]
