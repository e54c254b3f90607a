"""PAR refinement (docs/METHOD.md, PAR pseudo labels) as two Triton kernels: the neighbour affinity once per image, then one
launch per propagation iteration.

Math (J = 8 * len(dilations) neighbours, offsets (dy_j, dx_j) = (sy * d, sx * d) for each
dilation d and each of the 8 unit directions (sy, sx) in row-major order around the centre;
coordinates are clamped to the image = replicate padding):

    n_j(p)   = clamp(p + (dy_j, dx_j))
    std_k(p) = unbiased std over j of I_k(n_j(p))                      per image channel k
    a_j(p)   = -(1/CI) sum_k (|I_k(n_j(p)) - I_k(p)| / (std_k(p) + 1e-8) / 0.3)^2
    A_j(p)   = softmax_j(a(p))_j + 0.01 * softmax_j(-(dist_j / (std(dist) + 1e-8) / 0.3)^2)
    m_c(p)  <- sum_j A_j(p) * m_c(n_j(p))                              num_iter times

The affinity A (B x J x H x W, fp32 by default, bf16 with affinity_storage="bf16") is computed
ONCE per image, in fp32, and shared by every mask channel (the two background-threshold mask sets
are concatenated along C by the caller). Each iteration is one launch over (channel block fastest,
pixel tile; image) that reads the previous masks and A and writes the other of two fp32 ping-pong
buffers, so no B x C x J x H x W tensor ever exists. Bytes per call: image read once, A written
once, then per iteration A read once and the masks read and written once (bench/test_par.py
states them per production shape).

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
def _round_to(x, dtype: tl.constexpr):
    """x (fp32) in `dtype`; bf16 rounds to nearest even by integer arithmetic, because the Triton
    interpreter's fp32 -> bf16 cast truncates (a biased -2^-9 on average per weight, which ten
    iterations compound), while the GPU's cvt.rn rounds to nearest: same bits on both."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _par_affinity_kernel(
    img_ptr, pos_ptr, aff_ptr,
    H, W, CI,
    s_ib, s_ic, s_ih, s_iw,
    DY: tl.constexpr, DX: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """A[b, j, p] for one tile of BLOCK_P pixels of image b, all J = len(DY) neighbours at once.

    a_j(p) = -(1/CI) sum_k (|I_k(n_j(p)) - I_k(p)| / (std_k(p) + 1e-8) / 0.3)^2, std_k the
    unbiased std over the J neighbours (two-pass, in registers); A = softmax_j(a) + pos_j, pos the
    precomputed 0.01 * spatial softmax. Computed in fp32, stored in aff_ptr's dtype (fp32 or
    bf16), contiguous B x J x HW. No gradient.
    """
    J: tl.constexpr = len(DY)
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < hw
    row = offs_p // W
    col = offs_p % W
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    # the offset table is compile-time: J selects once per program instead of J loads
    dy = tl.zeros([BLOCK_J], dtype=tl.int32)
    dx = tl.zeros([BLOCK_J], dtype=tl.int32)
    for j in tl.static_range(J):
        dy = tl.where(offs_j == j, DY[j], dy)
        dx = tl.where(offs_j == j, DX[j], dx)
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
    tl.store(out, _round_to(aff, aff_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _par_step_kernel(
    src_ptr, aff_ptr, dst_ptr,
    H, W, C,
    s_b, s_c, s_h, s_w,
    DILS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One propagation step for BLOCK_C channels x BLOCK_P pixels of image b:

        dst[b, c, p] = sum_j A[b, j, p] * src[b, c, n_j(p)]      (fp32 accumulation)

    The channel block is the FASTEST grid axis: the programs of one pixel tile run side by side,
    so its affinity tile comes from DRAM once and the other channel blocks hit it in L2, and the
    resident programs cover a narrow band of rows whose +-max|dy| neighbourhood (every channel)
    stays in L2, so each mask element is fetched from DRAM about once per step.

    src has any strides and float dtype (the user's masks on the first step, an fp32 ping-pong
    buffer afterwards); A is fp32 or bf16; dst is fp32 contiguous B x C x HW. Reads and writes
    distinct buffers, so programs never race. The dilations are a compile-time table (no loads).
    """
    ND: tl.constexpr = len(DILS)
    J: tl.constexpr = 8 * ND
    n_cblk = tl.cdiv(C, BLOCK_C)
    pid_c = tl.program_id(0) % n_cblk
    pid_p = tl.program_id(0) // n_cblk
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < hw
    row = offs_p // W
    col = offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask2 = mask_c[:, None] & mask_p[None, :]
    src = src_ptr + b * s_b + offs_c.to(tl.int64)[:, None] * s_c  # BLOCK_C x 1 pointers
    aff = aff_ptr + b * J * hw + offs_p
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    # a runtime loop over the J neighbours: unrolled, the scheduler hoists the gathers of several
    # neighbours at once (each a BLOCK_C x BLOCK_P tile of 64-bit addresses): 255 registers, spills
    for j in range(J):
        di = j // 8
        q = j % 8
        q = q + (q >= 4)  # skip the centre of the 3 x 3 pattern: _BASE_OFFSETS order
        d = DILS[0]
        for i in tl.static_range(1, ND):
            d = tl.where(di == i, DILS[i], d)
        nrow = tl.minimum(tl.maximum(row + (q // 3 - 1) * d, 0), H - 1)
        ncol = tl.minimum(tl.maximum(col + (q % 3 - 1) * d, 0), W - 1)
        a = tl.load(aff + j * tl.cast(hw, tl.int64), mask=mask_p, other=0.0).to(tl.float32)  # J hw can pass 2^31
        off = nrow.to(tl.int64) * s_h + ncol.to(tl.int64) * s_w
        m = tl.load(src + off[None, :], mask=mask2, other=0.0)
        acc += a[None, :] * m.to(tl.float32)
    dst = dst_ptr + b * C * hw + offs_c.to(tl.int64)[:, None] * hw + offs_p[None, :]
    tl.store(dst, acc, mask=mask2)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_AFF_BLOCK_P = 32
_STEP_BLOCK_P = 128
_AFFINITY_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# bf16 storage halves the bytes the J-neighbour weights cost per iteration. Each stored weight is
# then the fp32 value times (1 + d), |d| <= 2^-8, and weights and masks are >= 0, so after n
# iterations every refined value lies within [(1 - 2^-8)^n, (1 + 2^-8)^n] times its fp32 value (up
# to fp32 summation): about +-4% at n = 10, 3.9e-3 relative on VOC-like maps.


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(sy * d, sx * d) for d in dilations for sy, sx in _BASE_OFFSETS]


def _offset_tables(dilations: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(DY, DX): the constexpr neighbour offset tables, J entries each."""
    offs = _offsets(dilations)
    return tuple(o[0] for o in offs), tuple(o[1] for o in offs)


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
def _pos_table(dilations: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The spatial term, fp32, J entries, cached per dilation list and device."""
    return torch.tensor(_spatial_affinity(dilations), dtype=torch.float32, device=device)


def _check_int32_span(name: str, t: torch.Tensor) -> None:
    # per-image pixel and channel indices are int32 inside the kernels (bases are int64)
    if t.shape[2] * t.shape[3] >= 2**31 // 64:
        raise ValueError(f"{name}: expected H * W < {2**31 // 64}, got {t.shape[2] * t.shape[3]}")


def _affinity_config(j: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_P, num_warps) of the affinity kernel: several BLOCK_J x BLOCK_P tiles (int64
    offsets, fp32 terms) are live at once; 8 warps keep them within ~150 registers (64 x 64 on 4
    warps spills with triton 3.6)."""
    return triton.next_power_of_2(j), _AFF_BLOCK_P, 8


def par_affinity_triton(image: torch.Tensor, dilations: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The PAR neighbour weights, B x J x H x W in `dtype` (fp32 or bf16; the reference's `par_affinity`)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
    b, ci, h, w = image.shape
    dil = tuple(int(d) for d in dilations)
    dy, dx = _offset_tables(dil)
    pos = _pos_table(dil, image.device)
    j = len(dy)
    aff = torch.empty((b, j, h, w), dtype=dtype, device=image.device)
    block_j, block_p, warps = _affinity_config(j)
    grid = (triton.cdiv(h * w, block_p), b)
    with _device_ctx(image):
        _par_affinity_kernel[grid](
            image, pos, aff,
            h, w, ci,
            *image.stride(),
            DY=dy, DX=dx,
            BLOCK_J=block_j, BLOCK_P=block_p,
            num_warps=warps,
        )
    return aff


def _step_config(c: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) of the step kernel.

    BLOCK_C minimizes the padded channel loads plus a per-block cost of about two channels (each
    block recomputes the J neighbour addresses and re-reads its affinity tile, from L2). Masked
    padding channels cost issue slots, not DRAM bytes.
    """
    best = None
    for bc in (2, 4, 8, 16, 32):
        nblk = triton.cdiv(c, bc)
        cost = (nblk * (bc + 2), -bc)
        if best is None or cost < best[0]:
            best = (cost, bc)
    return best[1], _STEP_BLOCK_P, 4


def _par_refine_launch(image: torch.Tensor, masks: torch.Tensor, dilations: list[int], num_iter: int,
                       affinity_storage: str) -> torch.Tensor:
    _check_int32_span("image", image)
    b, c, h, w = masks.shape
    if num_iter == 0:
        out = torch.empty((b, c, h, w), dtype=torch.float32, device=masks.device)
        out.copy_(masks)
        return out
    dil = tuple(int(d) for d in dilations)
    aff = par_affinity_triton(image, dil, _AFFINITY_DTYPES[affinity_storage])
    bufs = [torch.empty((b, c, h, w), dtype=torch.float32, device=masks.device)]
    if num_iter > 1:
        bufs.append(torch.empty_like(bufs[0]))
    block_c, block_p, warps = _step_config(c)
    # channel block fastest inside axis 0 (see _par_step_kernel); axis 0 has no 65535 limit
    grid = (triton.cdiv(c, block_c) * triton.cdiv(h * w, block_p), b)
    src = masks
    with _device_ctx(masks):
        for it in range(num_iter):
            dst = bufs[it % 2]
            _par_step_kernel[grid](
                src, aff, dst,
                h, w, c,
                *src.stride(),
                DILS=dil,
                BLOCK_C=block_c, BLOCK_P=block_p,
                num_warps=warps,
            )
            src = dst
    return src


# --------------------------------------------------------------------------------------------
# torch.library registration (forward only: PAR carries no gradient)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("more_fast::par_refine", mutates_args=())
def _par_refine_op(image: torch.Tensor, masks: torch.Tensor, dilations: list[int], num_iter: int,
                   affinity_storage: str) -> torch.Tensor:
    return _par_refine_launch(image, masks, dilations, num_iter, affinity_storage)


@_par_refine_op.register_fake
def _(image, masks, dilations, num_iter, affinity_storage):
    return masks.new_empty(masks.shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Public entry (kernels.par_refine checks the inputs and supplies the defaults)
# --------------------------------------------------------------------------------------------
def par_refine(
    image: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int], num_iter: int, affinity_storage: str
) -> torch.Tensor:
    """Refined masks, B x C x H x W fp32.

    The outputs carry no gradient: the inputs are detached (PAR only makes pseudo labels).
    Concatenate several mask sets of the same images along C to refine them in one call; the
    affinity is computed once per image and shared by all channels.
    """
    return _par_refine_op(image.detach(), masks.detach(), [int(d) for d in dilations], int(num_iter), affinity_storage)


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations (scripts/aot_report.py)
# --------------------------------------------------------------------------------------------
def aot_configs(case, dilations: Sequence[int] | None = None, affinity_storage: str | None = None) -> list:
    """The kernels `par_refine` launches for `case` (a kernels._launch.AotCase): the fp32 image at
    case.H x case.W and 2 (K + 1) mask channels (the two background-threshold sets the caller
    concatenates), contiguous, the given dilations and affinity storage (default: the op's, the
    training step's TrainConfig.par_affinity default too)."""
    from ._launch import DEFAULT_STAGES, aot_kernel, op_default
    from . import par_refine as public_op  # the package's function, where the defaults are

    if dilations is None:
        dilations = op_default(public_op, "dilations")
    if affinity_storage is None:
        affinity_storage = op_default(public_op, "affinity_storage")

    b, h, w = case.B, case.H, case.W
    c = 2 * (case.K + 1)
    dil = tuple(int(d) for d in dilations)
    dy, dx = _offset_tables(dil)
    aff_ty = "*" + affinity_storage
    shapes = f"B{b} C{c} {h}x{w} J{len(dy)}"
    block_j, aff_block_p, aff_warps = _affinity_config(len(dy))
    block_c, block_p, warps = _step_config(c)
    return [
        aot_kernel("par_affinity", _par_affinity_kernel, dict(
            img_ptr="*fp32", pos_ptr="*fp32", aff_ptr=aff_ty, H=h, W=w, CI=3,
            s_ib=3 * h * w, s_ic=h * w, s_ih=w, s_iw=1, DY=dy, DX=dx, BLOCK_J=block_j, BLOCK_P=aff_block_p,
        ), aff_warps, DEFAULT_STAGES, shapes),
        aot_kernel("par_step", _par_step_kernel, dict(
            src_ptr="*fp32", aff_ptr=aff_ty, dst_ptr="*fp32", H=h, W=w, C=c,
            s_b=c * h * w, s_c=h * w, s_h=w, s_w=1, DILS=dil, BLOCK_C=block_c, BLOCK_P=block_p,
        ), warps, DEFAULT_STAGES, shapes),
    ]
