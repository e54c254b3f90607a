"""Class-patch attention (docs/METHOD.md, Class-patch attention) as Triton kernels: `class_patch_attention`.

For the class-token queries (rows P .. P+K-1 of q, P = num_prefix, K = num_cls) over the patch
keys (rows P+K .. T-1 of k, N = T - P - K of them), the map reduced over the H heads, B x K x N:

    "mean_softmax":  out[b, c, n] = (1/H) sum_h softmax_j(s[b,h,c,:])[P+K+n]
                     s[b,h,c,j] = <q[b,h,P+c], k[b,h,j]> / sqrt(d), j over ALL T keys
    "sum_logits":    out[b, c, n] = sum_h <q[b,h,P+c], k[b,h,P+K+n]>   (no scale)

Design (two sweeps, no B x H x K x T tensor anywhere):
- The softmax of one (image, head, class) row needs its max and sum over all T keys before any
  patch probability is final, while the head reduction needs every head's normalized
  probabilities for one patch. A single pass would have to keep per-head unnormalized patch
  probabilities (B x H x K x N) until the row statistics are known, which is what we avoid.
  So "mean_softmax" runs two small kernels:
  1. `_cpa_row_stats_kernel`, grid (B*H, cdiv(K, BLOCK_M)): one pass over the T keys with the
     online-softmax recurrence (running max m, running sum l, rescaled by exp2(m_old - m_new))
     for a block of class queries; writes m (log2 domain) and 1/l: 2 x B x H x K floats.
  2. `_cpa_reduce_kernel`, grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_M), B): for one block of
     patches it loops over the heads in order 0..H-1 inside the program, recomputes the
     K x BLOCK_N logits of that head, turns them into probabilities exp2(s - m) / l and sums
     them in registers; the sum times 1/H is stored once. The head sum is a plain in-program
     loop: deterministic, no atomics.
  "sum_logits" needs no statistics: only kernel 2, summing the raw logits.
  Cost: the patch logits are computed twice (once per sweep); both sweeps read k once each
  (the prefix/class keys only in sweep 1). Everything else in memory is the B x K x N output.
- Blocks: BLOCK_D = the head dim rounded up to a power of two (>= 16, masked, so d = 40, 48 or
  any d works); BLOCK_M = K rounded up to a power of two in [16, 64] (several query blocks when
  K > 64); BLOCK_N = 64 keys (32 when BLOCK_D > 128).
- Precision (kernels/_launch.py, the precision policy): q and k are loaded in their dtype.
  fp16 / bf16 tiles go to tl.dot as they are on CUDA (exact products, fp32 accumulation); fp32
  tiles use "ieee" (F32_DOT: no TF32 rounding). Statistics, probabilities and sums are fp32;
  the output is fp32.
- Strides: q and k may have any strides (e.g. timm's qkv.permute(2, 0, 3, 1, 4) slices);
  nothing is copied. Offsets are int64.

Gradient: none. The map is a detached diagnostic (docs/METHOD.md, Class-patch attention). The op marks its output
non-differentiable, so calling it on tensors that require grad works and returns a tensor
with requires_grad=False (no graph is recorded through it).

fp64 inputs run `kernels.reference.class_patch_attention` (fp64 result, as the reference
gives); the kernels compute in fp32. Degenerate shapes with nothing to launch (B = 0 or
H = 0) also take the reference, which defines their value.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._launch import device_ctx as _device_ctx, dot_config as _dot_config

# fp32 inputs (kernels/_launch.py, the precision policy): exact fp32 products. Each logit is one
# d = 64 dot whose error the softmax exponent turns into relative error of the probabilities,
# and the op does 2 d flops per key it loads: its cost is reading the keys, not the dot
F32_DOT = "ieee"
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _cpa_row_stats_kernel(
    q_ptr, k_ptr, m_ptr, inv_l_ptr,
    H, T, D, num_prefix, num_cls,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Softmax row statistics of the class queries over all T keys, one (image, head) each.

    s_cj = <q_{P+c}, k_j> * qk_scale with qk_scale = log2(e) / sqrt(d) (log2 domain), so that
    softmax_j(<q, k_j> / sqrt(d)) = exp2(s_cj - m_c) / l_c with
    m_c = max_j s_cj and l_c = sum_j exp2(s_cj - m_c).
    Online over key blocks: m' = max(m, max_j s_cj), l' = l exp2(m - m') + sum_j exp2(s_cj - m').
    Writes m_c and 1 / l_c at [b, h, c] of two B x H x K fp32 buffers. No gradient.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # class index c
    row_ok = rows < num_cls
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    dd64 = dd.to(tl.int64)

    q_base = q_ptr + b * sqb + h * sqh
    q_off = (num_prefix + rows).to(tl.int64)[:, None] * sqt + dd64[None, :] * sqd
    qt = tl.load(q_base + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)

    k_base = k_ptr + b * skb + h * skh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        k_off = cols.to(tl.int64)[:, None] * skt + dd64[None, :] * skd
        kt = tl.load(k_base + k_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * qk_scale  # BLOCK_M x BLOCK_N
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # every key block holds at least one valid key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out_off = pid_bh * num_cls + rows
    tl.store(m_ptr + out_off, m_i, mask=row_ok)
    tl.store(inv_l_ptr + out_off, 1.0 / l_i, mask=row_ok)


@triton.jit
def _cpa_reduce_kernel(
    q_ptr, k_ptr, m_ptr, inv_l_ptr, out_ptr,
    H, D, num_prefix, num_cls, N,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    qk_scale, head_weight,
    MEAN_SOFTMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The head-reduced class-patch map for one block of classes x patches of one image.

    For h = 0 .. H-1 in order (deterministic): s_cn = <q_{P+c}, k_{P+K+n}> of head h;
    MEAN_SOFTMAX: acc += exp2(s_cn * qk_scale - m_hc) * (1 / l_hc) (the statistics of kernel 1);
    otherwise acc += s_cn. out[b, c, n] = acc * head_weight (1/H for the mean, 1 for the sum),
    fp32, B x K x N contiguous. No gradient.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # class index c
    row_ok = rows < num_cls
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # patch index n
    col_ok = cols < N
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    dd64 = dd.to(tl.int64)

    q_off = (num_prefix + rows).to(tl.int64)[:, None] * sqt + dd64[None, :] * sqd
    k_off = (num_prefix + num_cls + cols).to(tl.int64)[:, None] * skt + dd64[None, :] * skd
    q_mask = row_ok[:, None] & d_ok[None, :]
    k_mask = col_ok[:, None] & d_ok[None, :]
    valid = row_ok[:, None] & col_ok[None, :]

    q_head = q_ptr + b * sqb  # 64-bit pointers, advanced by one head stride per iteration
    k_head = k_ptr + b * skb
    stat_head = b * H * num_cls + rows  # int64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in range(0, H):
        qt = tl.load(q_head + q_off, mask=q_mask, other=0.0)
        kt = tl.load(k_head + k_off, mask=k_mask, other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        s = tl.dot(qt, tl.trans(kt), input_precision=PRECISION)  # BLOCK_M x BLOCK_N, fp32
        if MEAN_SOFTMAX:
            m_h = tl.load(m_ptr + stat_head, mask=row_ok, other=0.0)
            inv_l_h = tl.load(inv_l_ptr + stat_head, mask=row_ok, other=0.0)
            p = tl.exp2(s * qk_scale - m_h[:, None]) * inv_l_h[:, None]
            acc += tl.where(valid, p, 0.0)
        else:
            acc += s
        q_head += sqh
        k_head += skh
        stat_head += num_cls

    out_off = (b * num_cls + rows.to(tl.int64))[:, None] * N + cols.to(tl.int64)[None, :]
    tl.store(out_ptr + out_off, acc * head_weight, mask=valid)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_NUM_WARPS = 4


def _blocks(num_cls: int, head_dim: int, block_m: int | None, block_n: int | None) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(max(head_dim, 1)))
    if block_m is None:
        block_m = min(64, max(16, triton.next_power_of_2(num_cls)))
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    return block_m, block_n, block_d


def _launch(
    q: torch.Tensor, k: torch.Tensor, num_prefix: int, num_cls: int, reduce: str,
    block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """Run the kernels on validated fp32/fp16/bf16 inputs; returns B x K x N fp32.

    block_m / block_n override the tile sizes (powers of two >= 16; tests use them to force
    several query blocks)."""
    bsz, heads, t, d = q.shape
    n = t - num_prefix - num_cls
    out = torch.empty((bsz, num_cls, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    bm, bn, bd = _blocks(num_cls, d, block_m, block_n)
    upcast, precision = _dot_config(q.dtype, q.device, F32_DOT)
    qk_scale = _LOG2E / math.sqrt(d) if d > 0 else 0.0
    num_warps = _NUM_WARPS
    mean = reduce == "mean_softmax"
    with _device_ctx(q):  # Triton launches on the current device
        if mean:
            stats = torch.empty((2, bsz, heads, num_cls), dtype=torch.float32, device=q.device)
            m_buf, inv_l_buf = stats[0], stats[1]
            _cpa_row_stats_kernel[(bsz * heads, triton.cdiv(num_cls, bm))](
                q, k, m_buf, inv_l_buf,
                heads, t, d, num_prefix, num_cls,
                *q.stride(), *k.stride(),
                qk_scale,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=precision,
                num_warps=num_warps,
            )
        else:
            m_buf = inv_l_buf = out  # unused (MEAN_SOFTMAX is False)
        _cpa_reduce_kernel[(triton.cdiv(n, bn), triton.cdiv(num_cls, bm), bsz)](
            q, k, m_buf, inv_l_buf, out,
            heads, d, num_prefix, num_cls, n,
            *q.stride(), *k.stride(),
            qk_scale, (1.0 / heads) if mean else 1.0,
            MEAN_SOFTMAX=mean,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=precision,
            num_warps=num_warps,
        )
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration (forward only: the output is marked non-differentiable)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("more_fast::class_patch_attention", mutates_args=())
def _class_patch_attention_op(
    q: torch.Tensor, k: torch.Tensor, num_prefix: int, num_cls: int, reduce: str
) -> torch.Tensor:
    if q.dtype == torch.float64 or q.shape[0] == 0 or q.shape[1] == 0:
        return reference.class_patch_attention(q, k, num_prefix, num_cls, reduce)
    return _launch(q, k, num_prefix, num_cls, reduce)


@_class_patch_attention_op.register_fake
def _(q, k, num_prefix, num_cls, reduce):
    bsz, _, t, _ = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((bsz, num_cls, t - num_prefix - num_cls), dtype=dtype)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _backward(ctx, grad):  # never reached: the output is non-differentiable
    raise RuntimeError("more_fast::class_patch_attention is forward-only (a detached diagnostic map)")


torch.library.register_autograd(
    "more_fast::class_patch_attention", _backward, setup_context=_setup_context
)


# --------------------------------------------------------------------------------------------
# Public entry (kernels.class_patch_attention checks the inputs and supplies the default)
# --------------------------------------------------------------------------------------------
def class_patch_attention(
    q: torch.Tensor, k: torch.Tensor, num_prefix: int, num_cls: int, reduce: str
) -> torch.Tensor:
    """Head-reduced attention of the class queries over the patch keys: B x K x N fp32.

    q, k: B x heads x T x d (same shape and dtype, any strides); class rows
    num_prefix .. num_prefix + num_cls - 1, patch keys after them. reduce "mean_softmax": mean
    over heads of softmax(q k^T / sqrt(d)) normalized over all T keys; "sum_logits": sum over
    heads of the raw q.k. The result never requires grad (a diagnostic); fp64 inputs give the
    fp64 reference result.
    """
    return _class_patch_attention_op(q, k, int(num_prefix), int(num_cls), str(reduce))


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations (scripts/aot_report.py)
# --------------------------------------------------------------------------------------------
def aot_configs(case, registers: int = 4, reduce: str | None = None) -> list:
    """The kernels the op launches for `case` (a kernels._launch.AotCase): q and k of case.dtype
    as timm's attention slices them from qkv (B x T x 3 x heads x d, permuted), `registers`
    prefix tokens, case.K class queries, the given reduce (default: the op's, the backbone's
    mean_softmax)."""
    from ._launch import AOT_DEVICE as dev, DEFAULT_STAGES, TORCH_DTYPE, aot_kernel, op_default
    from . import class_patch_attention as public_op  # the package's function, where the defaults are

    if reduce is None:
        reduce = op_default(public_op, "reduce")

    b, heads, t, ncls = case.B, case.heads, case.T, case.K
    d = case.D // heads
    n = t - registers - ncls
    tp = "*" + case.dtype
    bm, bn, bd = _blocks(ncls, d, None, None)
    upcast, precision = _dot_config(TORCH_DTYPE[case.dtype], dev, F32_DOT, cuda=True)
    qs = (t * 3 * heads * d, d, 3 * heads * d, 1)
    strides = dict(zip(("sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd"), qs + qs))
    qk_scale = _LOG2E / math.sqrt(d)
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=precision)
    shapes = f"B{b} H{heads} T{t} d{d} K{ncls}"
    mean = reduce == "mean_softmax"
    out = [] if not mean else [aot_kernel("cpa_row_stats", _cpa_row_stats_kernel, dict(
        q_ptr=tp, k_ptr=tp, m_ptr="*fp32", inv_l_ptr="*fp32", H=heads, T=t, D=d, num_prefix=registers,
        num_cls=ncls, **strides, qk_scale=qk_scale, **blocks,
    ), _NUM_WARPS, DEFAULT_STAGES, shapes)]
    out.append(aot_kernel("cpa_reduce", _cpa_reduce_kernel, dict(
        q_ptr=tp, k_ptr=tp, m_ptr="*fp32", inv_l_ptr="*fp32", out_ptr="*fp32", H=heads, D=d, num_prefix=registers,
        num_cls=ncls, N=n, **strides, qk_scale=qk_scale, head_weight=1.0 / heads if mean else 1.0,
        MEAN_SOFTMAX=mean, **blocks,
    ), _NUM_WARPS, DEFAULT_STAGES, shapes))
    return out
