"""Fused L_ptc, the CAM-affinity consistency loss (docs/METHOD.md, Losses), as Triton kernels.

    xhat_i = x_i / max(||x_i||, 1e-8)                      (F.normalize, eps 1e-8)
    c_ij   = |<xhat_i, xhat_j>|                             pairs i != j of one image
    pair   = both labels != ignore_index;  pos: L_i == L_j;  neg: L_i != L_j
    L      = 0.5 (1 - S_pos / (n_pos + 1)) + 0.5 S_neg / (n_neg + 1)

Sums and counts run over all images together. No B x N x N tensor exists in forward or
backward: the |cos| tiles live in registers, flash-attention style.

Forward (3 launches):
1. `_affinity_rownorm_kernel`: rn_i = 1 / max(||x_i||, eps), fp32, B x N (saved for backward).
2. `_affinity_fwd_kernel`, grid (T (T + 1) / 2, B) over the tile pairs tj >= ti
   (T = cdiv(N, BLOCK)): the tile <x_i, x_j> by tl.dot over D chunks of the raw tokens, scaled
   by rn_i rn_j in fp32. c is symmetric, so only the upper triangle is launched; an off-diagonal
   tile counts twice, the diagonal tile once (it holds both (i, j) and (j, i)). Each program
   writes its partial S_pos, S_neg (fp32) and n_pos, n_neg (int32, exact) to its own slot.
3. `_affinity_finalize_kernel`, one program: sums the partials in a fixed order (deterministic,
   counts in int64), writes the loss and the pair weights w_pos = -0.5 / (n_pos + 1),
   w_neg = 0.5 / (n_neg + 1) (saved for backward).

Backward (1 launch):
4. `_affinity_bwd_kernel`, grid (D chunks of BLOCK_DO, T_i, B): for its rows and its D chunk,
   one pass over the column tiles j, recomputing S_ij = <x_i, x_j> over all of D each time,
       ghat_i = dL/dxhat_i = 2 g sum_j W_ij sign(c_ij) xhat_j      (W = w_pos / w_neg / 0)
   (the factor 2: c_ij appears as (i, j) and as (j, i)) as tl.dot(M, x_j[:, chunk]) with
   M_ij = 2 g W_ij sign(S_ij) rn_j, and <x_i, ghat_i> = sum_j M_ij S_ij from the same tiles, so
       dx = rn ghat - [||x|| >= eps] rn^3 x <x, ghat>          (F.normalize's gradient)
   is finished in registers and stored once in the dtype of the tokens. No scratch buffer, no
   atomics, no SM-count-dependent split: the same bits run to run on one GPU (across GPU models
   the forward's fp32 D chunk, `_fwd_config`, follows the compute capability, and so may the
   last bits). The price is the S tiles being
   recomputed once per dx chunk (6 times at D = 768: 14 N^2 D FLOPs per image instead of
   4 N^2 D) instead of an fp32 B x N x D partial buffer read and rewritten once per column tile
   (266 MB of traffic at N = 784, 4.3 GB at N = 3136).

Saved for backward: the tokens and labels (inputs), rn (B x N fp32) and the two pair weights.
Block sizes: 64 x 64 tiles on CUDA in the forward, 64 x 32 in the backward (8 warps, no
register spills for sm_80 and sm_90, `_bwd_config`); on the interpreter few large blocks (each
program costs Python time).

Precision (kernels/_launch.py, the precision policy): fp16 / bf16 tokens go to tl.dot natively
on CUDA (exact products, fp32 accumulation); fp32 tokens use 3xTF32 (F32_DOT); the backward's
M x_j product has fp32 operands (M is fp32) and uses the same. fp64 tokens are computed in fp32.
The loss is fp32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from ._launch import capability as _capability, device_ctx as _device_ctx, dot_config as _dot_config
from ._launch import pow2_clamp as _pow2_clamp

NORM_EPS = 1e-8  # F.normalize eps (ToCo)
# fp32 tokens (kernels/_launch.py, the precision policy): the N x N x D Gram products are the
# op's whole cost, and 3xTF32 keeps them about fp32-accurate on the tensor cores
F32_DOT = "tf32x3"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _affinity_rownorm_kernel(
    x_ptr, rn_ptr, R, N, D, sxb, sxn, sxd, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """rn[r] = 1 / max(||x[r]||, eps) for the R = B * N rows of x (any strides), fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = (rows // N).to(tl.int64) * sxb + (rows % N).to(tl.int64) * sxn
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ptrs = x_ptr + base[:, None] + offs_d[None, :].to(tl.int64) * sxd
        x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    rn = 1.0 / tl.maximum(tl.sqrt(ss), eps)
    tl.store(rn_ptr + rows, rn, mask=row_ok)


@triton.jit
def _affinity_fwd_kernel(
    x_ptr, lab_ptr, rn_ptr, tiles_ptr, psum_ptr, pcnt_ptr,
    N, D, ignore_index, sxb, sxn, sxd, slb, sln,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial sums of one tile pair (ti, tj), tj >= ti, of image b: only the upper triangle
    is launched (program t reads its pair from tiles[t], P = T (T + 1) / 2 pairs).

    psum[slot] = (sum_pos |c|, sum_neg |c|), pcnt[slot] = (n_pos, n_neg) with slot = b P + t;
    an off-diagonal tile counts twice (its mirror is not launched), the diagonal tile once.
    """
    t = tl.program_id(0)
    b = tl.program_id(1)
    num_p = tl.num_programs(0)
    ti = tl.load(tiles_ptr + 2 * t)
    tj = tl.load(tiles_ptr + 2 * t + 1)
    tile_w = 1 + (tj > ti).to(tl.int32)

    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < N
    mj = offs_j < N
    xb = x_ptr + b.to(tl.int64) * sxb
    rows_i = offs_i.to(tl.int64) * sxn
    rows_j = offs_j.to(tl.int64) * sxn

    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        cols = offs_d.to(tl.int64) * sxd
        a = tl.load(xb + rows_i[:, None] + cols[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        bt = tl.load(xb + cols[:, None] + rows_j[None, :], mask=md[:, None] & mj[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)

    lb = lab_ptr + b.to(tl.int64) * slb
    lab_i = tl.load(lb + offs_i.to(tl.int64) * sln, mask=mi, other=0).to(tl.int64)
    lab_j = tl.load(lb + offs_j.to(tl.int64) * sln, mask=mj, other=0).to(tl.int64)
    rn_i = tl.load(rn_ptr + b * N + offs_i, mask=mi, other=0.0)
    rn_j = tl.load(rn_ptr + b * N + offs_j, mask=mj, other=0.0)
    valid_i = mi & (lab_i != ignore_index)
    valid_j = mj & (lab_j != ignore_index)

    c = tl.abs(acc * rn_i[:, None] * rn_j[None, :])
    pair = valid_i[:, None] & valid_j[None, :] & (offs_i[:, None] != offs_j[None, :])
    same = lab_i[:, None] == lab_j[None, :]
    pos = pair & same
    neg = pair & (lab_i[:, None] != lab_j[None, :])
    wf = tile_w.to(tl.float32)
    s_pos = tl.sum(tl.sum(tl.where(pos, c, 0.0), axis=1), axis=0) * wf
    s_neg = tl.sum(tl.sum(tl.where(neg, c, 0.0), axis=1), axis=0) * wf
    n_pos = tl.sum(tl.sum(pos.to(tl.int32), axis=1), axis=0) * tile_w
    n_neg = tl.sum(tl.sum(neg.to(tl.int32), axis=1), axis=0) * tile_w

    slot = (b * num_p + t).to(tl.int64) * 2
    tl.store(psum_ptr + slot, s_pos)
    tl.store(psum_ptr + slot + 1, s_neg)
    tl.store(pcnt_ptr + slot, n_pos)
    tl.store(pcnt_ptr + slot + 1, n_neg)


@triton.jit
def _affinity_finalize_kernel(psum_ptr, pcnt_ptr, P, loss_ptr, coef_ptr, BLOCK_P: tl.constexpr):
    """One program: S and n summed over the P partial slots in a fixed order; the loss and
    the pair weights coef = (-0.5 / (n_pos + 1), 0.5 / (n_neg + 1))."""
    acc_sp = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_sn = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_np = tl.zeros([BLOCK_P], dtype=tl.int64)
    acc_nn = tl.zeros([BLOCK_P], dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        m = offs < P
        slot = offs.to(tl.int64) * 2
        acc_sp += tl.load(psum_ptr + slot, mask=m, other=0.0)
        acc_sn += tl.load(psum_ptr + slot + 1, mask=m, other=0.0)
        acc_np += tl.load(pcnt_ptr + slot, mask=m, other=0).to(tl.int64)
        acc_nn += tl.load(pcnt_ptr + slot + 1, mask=m, other=0).to(tl.int64)
    s_pos = tl.sum(acc_sp, axis=0)
    s_neg = tl.sum(acc_sn, axis=0)
    den_pos = (tl.sum(acc_np, axis=0) + 1).to(tl.float32)
    den_neg = (tl.sum(acc_nn, axis=0) + 1).to(tl.float32)
    loss = 0.5 * (1.0 - s_pos / den_pos) + 0.5 * (s_neg / den_neg)
    tl.store(loss_ptr, loss)
    tl.store(coef_ptr, -0.5 / den_pos)
    tl.store(coef_ptr + 1, 0.5 / den_neg)


@triton.jit
def _affinity_bwd_kernel(
    x_ptr, lab_ptr, rn_ptr, coef_ptr, gout_ptr, dx_ptr,
    N, D, ignore_index, sxb, sxn, sxd, slb, sln, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, DOT_PREC_F32: tl.constexpr,
):
    """dx[b, rows of ti, columns d0 .. d0 + BLOCK_DO - 1] in one pass over the column tiles:

        ghat_i = sum_j M_ij x_j,   M_ij = 2 g W_ij sign(S_ij) rn_j,   S_ij = <x_i, x_j>,
        dx_i   = rn_i ghat_i - [||x_i|| >= eps] rn_i^3 <x_i, ghat_i>,

    W_ij = coef[0] on positive pairs, coef[1] on negative pairs, 0 otherwise. Each column tile's
    S is recomputed over the whole of D (so is every D chunk's: the tensor-core work is traded
    for the memory of the old fp32 partial-ghat scratch), giving both M and <x_i, ghat_i> =
    sum_j M_ij S_ij, so the normalize backward needs no other D chunk: dx is written once, in
    the tokens' dtype, with no scratch. Fixed loop order, no split: deterministic on any GPU.
    """
    pid_d = tl.program_id(0)
    ti = tl.program_id(1)
    b = tl.program_id(2)
    go = tl.load(gout_ptr).to(tl.float32)
    c_pos = 2.0 * go * tl.load(coef_ptr)
    c_neg = 2.0 * go * tl.load(coef_ptr + 1)

    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    mi = offs_i < N
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mo = offs_o < D
    xb = x_ptr + b.to(tl.int64) * sxb
    lb = lab_ptr + b.to(tl.int64) * slb
    rows_i = offs_i.to(tl.int64) * sxn
    cols_o = offs_o.to(tl.int64) * sxd
    lab_i = tl.load(lb + offs_i.to(tl.int64) * sln, mask=mi, other=0).to(tl.int64)
    valid_i = mi & (lab_i != ignore_index)

    ghat = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    xg = tl.zeros([BLOCK_M], dtype=tl.float32)  # <x_i, ghat_i>
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        mj = offs_j < N
        rows_j = offs_j.to(tl.int64) * sxn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            cols = offs_d.to(tl.int64) * sxd
            a = tl.load(xb + rows_i[:, None] + cols[None, :], mask=mi[:, None] & md[None, :], other=0.0)
            bt = tl.load(xb + cols[:, None] + rows_j[None, :], mask=md[:, None] & mj[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)

        lab_j = tl.load(lb + offs_j.to(tl.int64) * sln, mask=mj, other=0).to(tl.int64)
        rn_j = tl.load(rn_ptr + b * N + offs_j, mask=mj, other=0.0)
        valid_j = mj & (lab_j != ignore_index)
        pair = valid_i[:, None] & valid_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        w = tl.where(lab_i[:, None] == lab_j[None, :], c_pos, c_neg)
        sgn = tl.where(acc > 0, 1.0, tl.where(acc < 0, -1.0, 0.0))
        m = tl.where(pair, w * sgn, 0.0) * rn_j[None, :]
        xg += tl.sum(m * acc, axis=1)
        xj = tl.load(xb + rows_j[:, None] + cols_o[None, :], mask=mj[:, None] & mo[None, :], other=0.0)
        ghat = tl.dot(m, xj.to(tl.float32), ghat, input_precision=DOT_PREC_F32)

    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DO):
        offs_d = d0 + tl.arange(0, BLOCK_DO)
        x = tl.load(xb + rows_i[:, None] + offs_d[None, :].to(tl.int64) * sxd,
                    mask=mi[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    norm = tl.sqrt(ss)
    rn = 1.0 / tl.maximum(norm, eps)
    proj = tl.where(norm >= eps, rn * rn * rn * xg, 0.0)
    xo = tl.load(xb + rows_i[:, None] + cols_o[None, :], mask=mi[:, None] & mo[None, :], other=0.0).to(tl.float32)
    dx = rn[:, None] * ghat - proj[:, None] * xo
    out = dx_ptr + (b.to(tl.int64) * N + offs_i.to(tl.int64))[:, None] * D + offs_o[None, :]
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=mi[:, None] & mo[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _narrow_d(dtype: torch.dtype | None, cc: int) -> bool:
    """16-wide D chunks instead of 32: fp32 tiles (3xTF32 splits each operand in two) on GPUs
    before sm_90, where ptxas spilled the 32-wide forward and backward (sm_80: 255 registers
    and 44-112 spill bytes; 16 wide: none, with triton 3.6 and 3.8)."""
    return dtype not in (torch.float16, torch.bfloat16) and cc < 90


def _fwd_config(device: torch.device, n: int, d: int, dtype: torch.dtype | None = None,
                cc: int | None = None) -> dict:
    """Block sizes of the forward (tests override this to exercise multi-tile paths). dtype: of
    the tokens; cc: the GPU's compute capability (default: the device's)."""
    if device.type == "cuda":
        cc = _capability(device) if cc is None else cc
        return dict(block=64, block_d=16 if _narrow_d(dtype, cc) else 32, num_warps=4, num_stages=3)
    # interpreter: each program costs ~10 ms of Python, so few large blocks
    return dict(block=_pow2_clamp(n, 16, 256), block_d=_pow2_clamp(d, 16, 256), num_warps=4, num_stages=1)


def _bwd_config(device: torch.device, n: int, d: int) -> dict:
    """Block sizes of the backward (tests override this). The same for every GPU model and dtype
    (no SM-count split), so the backward's summation order is the same on any GPU. 64 x 32
    tiles, 16-wide S chunks, 128-wide dx chunks, 8 warps: the largest that ptxas compiles
    without spills for sm_80 and sm_90 with triton 3.6 and 3.8 (contiguous tokens; 64 x 64
    tiles or 256-wide chunks spill). At D = 768 each S tile is recomputed for 6 dx chunks."""
    if device.type == "cuda":
        return dict(block_m=64, block_n=32, block_d=16, block_do=128, num_warps=8, num_stages=2)
    block, block_d = _pow2_clamp(n, 16, 256), _pow2_clamp(d, 16, 256)
    return dict(block_m=block, block_n=block, block_d=block_d, block_do=block_d, num_warps=4, num_stages=1)


_FINALIZE = dict(block_p=1024, num_warps=4)


def _rows_config(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(block_r=8, block_d=256, num_warps=4)
    return dict(block_r=256, block_d=256, num_warps=4)


@functools.lru_cache(maxsize=64)
def _upper_tiles(t: int, device: torch.device) -> torch.Tensor:
    """The T (T + 1) / 2 tile pairs (ti, tj), tj >= ti, row-major: P x 2 int32."""
    return torch.triu_indices(t, t).t().contiguous().to(device=device, dtype=torch.int32)


def _affinity_forward(tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(loss fp32 scalar, coef fp32 [2] = pair weights, rn fp32 B x N) of validated inputs."""
    b, n, d = tokens.shape
    dev = tokens.device
    cfg = _fwd_config(dev, n, d, dtype=tokens.dtype)
    rcfg = _rows_config(dev)
    upcast, prec = _dot_config(tokens.dtype, dev, F32_DOT)
    block = cfg["block"]
    t = triton.cdiv(n, block)
    rn = torch.empty((b, n), dtype=torch.float32, device=dev)
    tiles = _upper_tiles(t, dev)
    n_tiles = tiles.shape[0]
    psum = torch.empty((b * n_tiles, 2), dtype=torch.float32, device=dev)
    pcnt = torch.empty((b * n_tiles, 2), dtype=torch.int32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    coef = torch.empty((2,), dtype=torch.float32, device=dev)
    sxb, sxn, sxd = tokens.stride()
    slb, sln = labels.stride()
    with _device_ctx(tokens):
        if b * n > 0:  # otherwise no pair: the loss is 0.5
            _affinity_rownorm_kernel[(triton.cdiv(b * n, rcfg["block_r"]),)](
                tokens, rn, b * n, n, d, sxb, sxn, sxd, NORM_EPS,
                BLOCK_R=rcfg["block_r"], BLOCK_D=rcfg["block_d"], num_warps=rcfg["num_warps"],
            )
            _affinity_fwd_kernel[(n_tiles, b)](
                tokens, labels, rn, tiles, psum, pcnt, n, d, ignore_index, sxb, sxn, sxd, slb, sln,
                BLOCK=block, BLOCK_D=cfg["block_d"], UPCAST=upcast, DOT_PREC=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        _affinity_finalize_kernel[(1,)](psum, pcnt, b * n_tiles, loss, coef, BLOCK_P=_FINALIZE["block_p"],
                                        num_warps=_FINALIZE["num_warps"])
    return loss, coef, rn


def _affinity_backward(grad: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, rn: torch.Tensor,
                       coef: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """dL/dtokens (contiguous, the dtype of tokens) for the upstream scalar gradient `grad`."""
    b, n, d = tokens.shape
    dev = tokens.device
    cfg = _bwd_config(dev, n, d)
    upcast, prec = _dot_config(tokens.dtype, dev, F32_DOT)
    dx = torch.empty((b, n, d), dtype=tokens.dtype, device=dev)
    if dx.numel() == 0:
        return dx
    grad = grad.reshape(()).to(device=dev)
    sxb, sxn, sxd = tokens.stride()
    slb, sln = labels.stride()
    grid = (triton.cdiv(d, cfg["block_do"]), triton.cdiv(n, cfg["block_m"]), b)
    with _device_ctx(tokens):
        _affinity_bwd_kernel[grid](
            tokens, labels, rn, coef, grad, dx,
            n, d, ignore_index, sxb, sxn, sxd, slb, sln, NORM_EPS,
            BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], BLOCK_DO=cfg["block_do"],
            UPCAST=upcast, DOT_PREC=prec, DOT_PREC_F32=_dot_config(torch.float32, dev, F32_DOT)[1],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dx


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("more_fast::affinity_loss", mutates_args=())
def _affinity_loss_op(
    tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _affinity_forward(tokens, labels, ignore_index)


@_affinity_loss_op.register_fake
def _(tokens, labels, ignore_index):
    b, n, _ = tokens.shape
    return (
        tokens.new_empty((), dtype=torch.float32),
        tokens.new_empty((2,), dtype=torch.float32),
        tokens.new_empty((b, n), dtype=torch.float32),
    )


@torch.library.custom_op("more_fast::affinity_loss_backward", mutates_args=())
def _affinity_loss_bwd_op(
    grad: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, rn: torch.Tensor, coef: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    return _affinity_backward(grad, tokens, labels, rn, coef, ignore_index)


@_affinity_loss_bwd_op.register_fake
def _(grad, tokens, labels, rn, coef, ignore_index):
    return torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device)


def _setup_context(ctx, inputs, output):
    tokens, labels, ignore_index = inputs
    _, coef, rn = output
    ctx.save_for_backward(tokens, labels, rn, coef)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, grad_coef, grad_rn):
    tokens, labels, rn, coef = ctx.saved_tensors
    grad_tokens = None
    if ctx.needs_input_grad[0]:
        grad_tokens = _affinity_loss_bwd_op(grad_loss, tokens, labels, rn, coef, ctx.ignore_index)
    return grad_tokens, None, None


torch.library.register_autograd("more_fast::affinity_loss", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry (kernels.affinity_loss checks the inputs and supplies the default)
# --------------------------------------------------------------------------------------------
def affinity_loss(tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """L_ptc (docs/METHOD.md, Losses) of B x N x D tokens and B x N integer labels: an fp32 scalar."""
    return _affinity_loss_op(tokens, labels, int(ignore_index))[0]


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations (scripts/aot_report.py)
# --------------------------------------------------------------------------------------------
def aot_configs(case) -> list:
    """The kernels forward and backward launch for `case` (a kernels._launch.AotCase): contiguous
    B x N x D tokens of case.dtype, int64 labels, on a GPU of compute capability case.cc."""
    from ._launch import AOT_DEVICE as dev, DEFAULT_STAGES, TORCH_DTYPE, aot_kernel, op_default
    from . import affinity_loss as public_op  # the package's function, where the defaults are

    b, n, d = case.B, case.N, case.D
    xp = "*" + case.dtype
    upcast, prec = _dot_config(TORCH_DTYPE[case.dtype], dev, F32_DOT, cuda=True)
    prec_f32 = _dot_config(torch.float32, dev, F32_DOT, cuda=True)[1]
    dtype = TORCH_DTYPE[case.dtype]
    fcfg, rcfg = _fwd_config(dev, n, d, dtype=dtype, cc=case.cc), _rows_config(dev)
    bcfg = _bwd_config(dev, n, d)
    t = triton.cdiv(n, fcfg["block"])
    n_tiles = t * (t + 1) // 2
    x = dict(sxb=n * d, sxn=d, sxd=1)
    lab = dict(slb=n, sln=1)
    shapes = f"B{b} N{n} D{d}"
    ignore = op_default(public_op, "ignore_index")
    rows = dict(R=b * n, N=n, D=d, **x, eps=NORM_EPS, BLOCK_R=rcfg["block_r"], BLOCK_D=rcfg["block_d"])
    return [
        aot_kernel("affinity_rownorm", _affinity_rownorm_kernel, dict(x_ptr=xp, rn_ptr="*fp32", **rows),
                   rcfg["num_warps"], DEFAULT_STAGES, shapes),
        aot_kernel("affinity_fwd", _affinity_fwd_kernel, dict(
            x_ptr=xp, lab_ptr="*i64", rn_ptr="*fp32", tiles_ptr="*i32", psum_ptr="*fp32", pcnt_ptr="*i32", N=n, D=d,
            ignore_index=ignore,
            **x, **lab, BLOCK=fcfg["block"], BLOCK_D=fcfg["block_d"], UPCAST=upcast, DOT_PREC=prec,
        ), fcfg["num_warps"], fcfg["num_stages"], shapes),
        aot_kernel("affinity_finalize", _affinity_finalize_kernel, dict(
            psum_ptr="*fp32", pcnt_ptr="*i32", P=b * n_tiles, loss_ptr="*fp32", coef_ptr="*fp32",
            BLOCK_P=_FINALIZE["block_p"],
        ), _FINALIZE["num_warps"], DEFAULT_STAGES, shapes),
        aot_kernel("affinity_bwd", _affinity_bwd_kernel, dict(
            x_ptr=xp, lab_ptr="*i64", rn_ptr="*fp32", coef_ptr="*fp32", gout_ptr="*fp32", dx_ptr=xp,
            N=n, D=d, ignore_index=ignore, **x, **lab, eps=NORM_EPS,
            BLOCK_M=bcfg["block_m"], BLOCK_N=bcfg["block_n"], BLOCK_D=bcfg["block_d"], BLOCK_DO=bcfg["block_do"],
            UPCAST=upcast, DOT_PREC=prec, DOT_PREC_F32=prec_f32,
        ), bcfg["num_warps"], bcfg["num_stages"], shapes),
    ]
