"""GCR aggregation (docs/METHOD.md, GCR) as Triton kernels: `gcr_aggregate`.

For one image b and one class row i (h_i in R^D), over the L = K + N nodes e_l in R^D:

    A_il  = <h_i, e_l> / sqrt(D)                      logits against every node
    w, idx = top-k of A_i.  (k values, k distinct node indices)
    Nb_j  = e_{idx_j}                                  j = 1..k
    p     = softmax_j(w)
    R_j   = (1 - p_j) h_i + p_j Nb_j
    u_j   = h_i + R_j = (2 - p_j) h_i + p_j Nb_j
    g_j   = tanh(u_j)                                  (elementwise over d)
    s_j   = S_j G_j with S_j = sum_d Nb_j[d], G_j = sum_d g_j[d]     ("published")
          = <Nb_j, g_j>                                              ("dot")
    a     = softmax_j(s)
    M_i   = sum_j a_j Nb_j

Backward (by hand, checked against the reference's autograd in float64): dh comes from
`_gcr_backward_rows_kernel`, de from `_gcr_backward_nodes_kernel`; each kernel's docstring and
passes carry the equations they compute. e's gradient lands only on the selected rows.

Kernels (no B x K x k x D or B x K x L x D tensor exists, forward or backward):
1. `_gcr_logits_kernel`, grid (B, cdiv(K, BLOCK_M), cdiv(L, BLOCK_N)): A = h e^T / sqrt(D)
   with tl.dot over D chunks, written to a B x K x L tensor in the compute dtype (fp32; fp64
   for fp64 inputs). That tensor is small (4 x 80 x 864 fp32 = 1.1 MB at COCO shapes) and lets
   the top-k run per row with full parallelism over the B x K rows.
2. `_gcr_topk_kernel`, grid (B * K,), one warp per class row: the top-k of the row by k
   max-reductions over packed int64 keys (`_topk_key`), over L in tiles of BLOCK_L logits
   (a later tile is merged with the running set, or skipped when its best key is below the
   running k-th); then p = softmax of the k logits. Writes idx (int32) and p, B x K x k.
3. `_gcr_aggregate_kernel`, grid (B * K,), one class row per program: two passes over D
   chunks of the gathered [KPAD, BLOCK_D] neighbour tile: pass 1 recomputes g and reduces
   S, G (or <Nb, g>), then a = softmax(s); pass 2 writes M. Saved for the backward: idx, p, a
   (B x K x k each). The logits tensor is dropped after the forward.
4. `_gcr_backward_rows_kernel`, grid (B * K,): three passes over D chunks per class row
   (da, S, G -> ds; du -> dp -> dw; du, dw -> dh), recomputing g each time instead of
   storing it; writes dh and the per-edge scalars ds, dw (and S, G for "published"),
   B x K x k each.
5. The index map is inverted with a stable torch.sort of the B x (K k) flat indices (per
   image, edges grouped by node, ascending in their flat position i k + j within a node), the
   run index of each edge, and the bounds of the edge chunks by node-run starts.
   Deterministic: a stable sort has one answer.
6. `_gcr_backward_nodes_kernel`, grid (D chunks, edge chunks + zero-row blocks, B): each
   program takes the node runs starting in its chunk of SEG sorted edges (at most SEG + K - 1
   edges whatever the distribution) for BLOCK_D columns; the C_ij tile is summed into its runs
   by a one-hot tl.dot in registers, each finished run stored once. The zero-row programs
   write the rows nobody selected. No atomics: the scatter is deterministic.
Memory beyond the inputs and outputs: the B x K x L logits (forward only), and B x K x k
scalars (idx, p, a saved; ds, dw, S, G and the CSR in the backward).

Top-k and ties: keys pack the logit (rounded to fp32 for fp64 inputs) into the high 32 bits as
an order-preserving integer and (2^31 - 1 - l) into the low 32 bits; the k largest keys are the
k largest logits, equal logits ordered by the lower node index first. With distinct values
the selected set is torch.topk's (the order of the k neighbours never matters: everything
after the selection is symmetric in j). On ties torch.topk's choice is unspecified; here the
lower index wins (torch.topk on the CPU did the same in the one case we tried; not a
guarantee of torch's). For fp64 inputs
the selection compares logits rounded to fp32 (values closer than that count as ties); every
other quantity is fp64. NaN logits sort above +inf for a positive NaN and below -inf for a
negative NaN; -0.0 sorts below +0.0.

Precision: inputs are loaded in their dtype and upcast to the compute dtype (fp32, fp64 for
fp64 inputs) after the load; all sums accumulate in it; M, dh, de are stored in h's / e's
dtype. tl.dot (kernels/_launch.py, the precision policy): fp16 / bf16 tiles go in as they are
on CUDA (exact products, fp32 accumulation); fp32 tiles use "ieee" (F32_DOT: no TF32 rounding,
which would change the selected neighbours against the reference); fp64 tiles "ieee" in fp64;
the node kernel's one-hot scatter is an "ieee" dot in the compute dtype (exact).
tanh is written with tl.exp (no libdevice). The softmax backwards take a pairwise form
(`_gcr_backward_rows_kernel`). What remains in fp32 is conditioning: a = softmax(s)
turns the rounding of s (~1e-7 |s|) into relative error of the small a_j, which dh is made
of, so fp32 gradients are good to ~1e-7 max|s| (|s| reaches 100+ in the "published" mode at
D = 768 with unit-scale features). Strides: any strides for h, e and the incoming
gradient; nothing is copied. Offsets are int64.

Launch configuration (GPU; checked by compiling every kernel for sm_90 and sm_86 with triton
3.8 without a device: no spills for k <= 64): logits 16 x 64 tiles over 32-wide D chunks, 4
warps; top-k one warp, 1024-logit tiles; per-row kernels [KPAD, BLOCK_D] tiles of 2048
elements (KPAD = next power of two >= k, at least 16), 8 warps; node kernel 32 rows x 32
edges x 32 channels, 4 warps, num_stages=1. k > 64 works but the per-row tiles get narrow
and the pairwise [KPAD, KPAD] softmax backward spills. The interpreter uses larger tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_ctx as _device_ctx, dot_config as _dot_config, interpreted as _launch_interpreted

# fp32 inputs (kernels/_launch.py, the precision policy): exact fp32 products for the logits,
# whose top-k picks the neighbours (a rounding-level change flips a near tie against the
# reference's choice); the logits product is small (K x L x D per image)
F32_DOT = "ieee"
_NEG_KEY = tl.constexpr(-9223372036854775807)  # below every packed key of a real logit
_MAX_KEY = tl.constexpr(9223372036854775807)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _topk_key(v, l):
    """Packed int64 key: order-preserving int32 image of the fp32 value v (high 32 bits) and
    2^31 - 1 - l (low 32 bits, l < 2^31), so that key order = value order, then lower index
    first. (2^31 - 1 keeps every constant an int32: no uint32 promotion rules involved.)"""
    bits = v.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - l.to(tl.int64))


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - t) / (1 + t), t = exp(-2|x|): no overflow, no libdevice."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _gcr_logits_kernel(
    h_ptr, e_ptr, a_ptr,
    K, L, D,
    s_hb, s_hk, s_hd,
    s_eb, s_el, s_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, CDT: tl.constexpr,
):
    """A[b, i, l] = <h[b, i], e[b, l]> / sqrt(D) for a BLOCK_M x BLOCK_N tile (tl.dot over
    BLOCK_K chunks of D). A is a contiguous B x K x L tensor in the compute dtype CDT.
    No gradient flows through this kernel directly: the backward kernels use dA only at the
    top-k entries (dh += dw Nb / sqrt(D), de_idx += dw h / sqrt(D))."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < K
    col_ok = cols < L
    h_base = h_ptr + b * s_hb + rows.to(tl.int64)[:, None] * s_hk
    e_base = e_ptr + b * s_eb + cols.to(tl.int64)[None, :] * s_el
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
    for d0 in range(0, D, BLOCK_K):
        dd = d0 + tl.arange(0, BLOCK_K)
        d_ok = dd < D
        hv = tl.load(h_base + dd.to(tl.int64)[None, :] * s_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        ev = tl.load(e_base + dd.to(tl.int64)[:, None] * s_ed, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            hv = hv.to(CDT)
            ev = ev.to(CDT)
        acc = tl.dot(hv, ev, acc=acc, input_precision=PRECISION, out_dtype=CDT)
    sqrt_d = tl.sqrt(tl.zeros([BLOCK_N], dtype=CDT) + D)
    acc = acc / sqrt_d[None, :]
    a_off = (b * K + rows.to(tl.int64))[:, None] * L + cols.to(tl.int64)[None, :]
    tl.store(a_ptr + a_off, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gcr_topk_kernel(
    a_ptr, idx_ptr, p_ptr,
    L, k,
    KPAD: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Top-k of one logits row A[b, i, :] (pid = b K + i) and p = softmax of the k values.

    Selection over packed int64 keys (`_topk_key`; unique, so each step removes exactly one):
    the first tile of BLOCK_L logits gives the k largest by k max-reductions; each later tile
    is merged with the running set the same way over their union, and skipped when its best
    key is below the running k-th (most tiles, once the set has settled). Entries j >= k of
    the KPAD-wide set are padding. Writes idx (int32, largest logit first; on equal logits the
    lower node index first) and p at [(b K + i) k + j]. Run with one warp: the reductions
    then stay within a warp."""
    pid = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + pid * L
    jj = tl.arange(0, KPAD)
    valid = jj < k

    # first tile: select from its candidates alone
    ll = tl.arange(0, BLOCK_L)
    l_ok = ll < L
    v = tl.load(a_row + ll, mask=l_ok, other=0.0).to(tl.float32)
    cand = tl.where(l_ok, _topk_key(v, ll), _NEG_KEY)
    run = tl.full([KPAD], _NEG_KEY, tl.int64)
    for t in range(0, k):
        best = tl.max(cand, axis=0)
        run = tl.where(jj == t, best, run)
        cand = tl.where(cand == best, _NEG_KEY, cand)
    # later tiles: merge
    for l0 in range(BLOCK_L, L, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        l_ok = ll < L
        v = tl.load(a_row + ll, mask=l_ok, other=0.0).to(tl.float32)
        cand = tl.where(l_ok, _topk_key(v, ll), _NEG_KEY)
        kth = tl.min(tl.where(valid, run, _MAX_KEY), axis=0)
        if tl.max(cand, axis=0) > kth:  # else nothing in this tile enters the top-k
            new = tl.full([KPAD], _NEG_KEY, tl.int64)
            for t in range(0, k):  # the t-th largest of run U cand
                best = tl.maximum(tl.max(run, axis=0), tl.max(cand, axis=0))
                new = tl.where(jj == t, best, new)
                run = tl.where(run == best, _NEG_KEY, run)
                cand = tl.where(cand == best, _NEG_KEY, cand)
            run = new

    idx = tl.where(valid, (2147483647 - (run & 2147483647)).to(tl.int32), 0)
    w = tl.load(a_row + idx, mask=valid, other=0.0)  # the exact logits (compute dtype)
    w = tl.where(valid, w, float("-inf"))
    p = tl.exp(w - tl.max(w, axis=0))
    p = p / tl.sum(p, axis=0)
    e_off = pid * k + jj
    tl.store(idx_ptr + e_off, idx, mask=valid)
    tl.store(p_ptr + e_off, p, mask=valid)


@triton.jit
def _gcr_aggregate_kernel(
    h_ptr, e_ptr, m_ptr, idx_ptr, p_ptr, att_ptr,
    K, D, k,
    s_hb, s_hk, s_hd,
    s_eb, s_el, s_ed,
    s_mb, s_mk, s_md,
    KPAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PUBLISHED: tl.constexpr, CDT: tl.constexpr,
):
    """One class row (b, i), given its top-k idx and p: g, s, a and M (module docstring).

    Pass 1 over D chunks reduces S_j, G_j (or <Nb_j, g_j>) for the gathered [KPAD, BLOCK_D]
    tile of neighbour rows; a = softmax(s); pass 2 re-gathers the rows and writes
    M_i = sum_j a_j Nb_j. Entries j >= k are padding (p = a = 0, never stored). Writes a at
    [(b K + i) k + j] for the backward."""
    pid = tl.program_id(0)
    b = (pid // K).to(tl.int64)
    i = (pid % K).to(tl.int64)
    jj = tl.arange(0, KPAD)
    valid = jj < k
    e_off = (b * K + i) * k + jj
    idx = tl.load(idx_ptr + e_off, mask=valid, other=0)
    p = tl.load(p_ptr + e_off, mask=valid, other=0.0)

    # ---- pass 1: scores
    h_row = h_ptr + b * s_hb + i * s_hk
    nb_rows = e_ptr + b * s_eb + idx.to(tl.int64)[:, None] * s_el
    two_minus_p = (2.0 - p)[:, None]
    p_col = p[:, None]
    s_nb = tl.zeros([KPAD], dtype=CDT)
    s_g = tl.zeros([KPAD], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        hv = tl.load(h_row + dd.to(tl.int64) * s_hd, mask=d_ok, other=0.0).to(CDT)
        nb = tl.load(nb_rows + dd.to(tl.int64)[None, :] * s_ed, mask=valid[:, None] & d_ok[None, :], other=0.0).to(CDT)
        g = _tanh(two_minus_p * hv[None, :] + p_col * nb)
        if PUBLISHED:
            s_nb += tl.sum(nb, axis=1)
            s_g += tl.sum(g, axis=1)
        else:
            s_g += tl.sum(nb * g, axis=1)
    if PUBLISHED:
        s = s_nb * s_g
    else:
        s = s_g
    s = tl.where(valid, s, float("-inf"))
    att = tl.exp(s - tl.max(s, axis=0))
    att = att / tl.sum(att, axis=0)

    # ---- pass 2: M_i = sum_j a_j Nb_j
    m_row = m_ptr + b * s_mb + i * s_mk
    att_col = att[:, None]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        nb = tl.load(nb_rows + dd.to(tl.int64)[None, :] * s_ed, mask=valid[:, None] & d_ok[None, :], other=0.0).to(CDT)
        mv = tl.sum(att_col * nb, axis=0)
        tl.store(m_row + dd.to(tl.int64) * s_md, mv.to(m_ptr.dtype.element_ty), mask=d_ok)

    tl.store(att_ptr + e_off, att, mask=valid)


@triton.jit
def _gcr_backward_rows_kernel(
    dm_ptr, h_ptr, e_ptr, idx_ptr, p_ptr, att_ptr,
    dh_ptr, ds_ptr, dw_ptr, snb_ptr, sg_ptr,
    K, D, k,
    s_gb, s_gk, s_gd,
    s_hb, s_hk, s_hd,
    s_eb, s_el, s_ed,
    s_db, s_dk, s_dd,
    KPAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PUBLISHED: tl.constexpr, CDT: tl.constexpr,
):
    """Backward of one class row (b, i), given dM = dm[b, i]: dh_i (stored in h's dtype) and the
    per-edge scalars ds, dw (and S, G for "published") that the node kernel needs for de.

    Three passes over D chunks (each pass's equations sit above it); g and du are recomputed in
    each pass, so nothing of size k x D is kept. Both softmax backwards take the pairwise
    [KPAD, KPAD] form ds_j = a_j sum_l a_l (da_j - da_l) instead of a_j (da_j - <a, da>): with a
    peaked a, <a, da> nearly equals da_j and the subtraction cancels (measured: 5-7x less dh
    error than the fp32 reference's autograd)."""
    pid = tl.program_id(0)
    b = (pid // K).to(tl.int64)
    i = (pid % K).to(tl.int64)
    jj = tl.arange(0, KPAD)
    valid = jj < k
    e_off = (b * K + i) * k + jj
    idx = tl.load(idx_ptr + e_off, mask=valid, other=0)
    p = tl.load(p_ptr + e_off, mask=valid, other=0.0)
    att = tl.load(att_ptr + e_off, mask=valid, other=0.0)
    h_row = h_ptr + b * s_hb + i * s_hk
    g_row = dm_ptr + b * s_gb + i * s_gk
    nb_rows = e_ptr + b * s_eb + idx.to(tl.int64)[:, None] * s_el
    two_minus_p = (2.0 - p)[:, None]
    p_col = p[:, None]

    # ---- pass 1: da, S, G -> ds
    #   da_j = <dM, Nb_j>                                  (M_i = sum_j a_j Nb_j)
    #   ds_j = a_j (da_j - sum_l a_l da_l)                 (a = softmax(s); pairwise form below)
    #   published: S_j = sum_d Nb_j[d], G_j = sum_d g_j[d] (s_j = S_j G_j, needed for dg)
    da = tl.zeros([KPAD], dtype=CDT)
    s_nb = tl.zeros([KPAD], dtype=CDT)
    s_g = tl.zeros([KPAD], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        ddl = dd.to(tl.int64)
        nb = tl.load(nb_rows + ddl[None, :] * s_ed, mask=valid[:, None] & d_ok[None, :], other=0.0).to(CDT)
        gv = tl.load(g_row + ddl * s_gd, mask=d_ok, other=0.0).to(CDT)
        da += tl.sum(nb * gv[None, :], axis=1)
        if PUBLISHED:
            hv = tl.load(h_row + ddl * s_hd, mask=d_ok, other=0.0).to(CDT)
            g = _tanh(two_minus_p * hv[None, :] + p_col * nb)
            s_nb += tl.sum(nb, axis=1)
            s_g += tl.sum(g, axis=1)
    # (each loop result gets exactly one use, the where: triton's OptimizeThreadLocality pass
    # asserts on a reduction accumulator that is used more than once after its loop)
    da = tl.where(valid, da, 0.0)
    s_nb = tl.where(valid, s_nb, 0.0)
    s_g = tl.where(valid, s_g, 0.0)
    ds = att * tl.sum(att[None, :] * (da[:, None] - da[None, :]), axis=1)
    # dg_j = ds_j S_j 1 (published: dG_j = ds_j S_j, spread over d), ds_j Nb_j (dot)
    ds_col = ds[:, None]
    dgs_col = (ds * s_nb)[:, None]

    # ---- pass 2: du -> dp -> dw
    #   du_j = dg_j * (1 - g_j^2)                          (g_j = tanh(u_j))
    #   dp_j = <du_j, Nb_j - h_i>                          (u_j = (2 - p_j) h_i + p_j Nb_j)
    #   dw_j = p_j (dp_j - sum_l p_l dp_l)                 (p = softmax(w); pairwise form below)
    dp = tl.zeros([KPAD], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        ddl = dd.to(tl.int64)
        nb = tl.load(nb_rows + ddl[None, :] * s_ed, mask=valid[:, None] & d_ok[None, :], other=0.0).to(CDT)
        hv = tl.load(h_row + ddl * s_hd, mask=d_ok, other=0.0).to(CDT)
        g = _tanh(two_minus_p * hv[None, :] + p_col * nb)
        if PUBLISHED:
            du = dgs_col * (1.0 - g * g)
        else:
            du = ds_col * nb * (1.0 - g * g)
        du = tl.where(d_ok[None, :], du, 0.0)
        dp += tl.sum(du * (nb - hv[None, :]), axis=1)
    dp = tl.where(valid, dp, 0.0)
    dw = p * tl.sum(p[None, :] * (dp[:, None] - dp[None, :]), axis=1)
    sqrt_d = tl.sqrt(tl.zeros([KPAD], dtype=CDT) + D)
    dwn_col = (dw / sqrt_d)[:, None]

    # ---- pass 3: dh
    #   dA_{i, idx_j} = dw_j (0 off the top-k), A_il = <h_i, e_l> / sqrt(D), so
    #   dh_i = sum_j (2 - p_j) du_j + (1/sqrt(D)) sum_j dw_j Nb_j
    dh_row = dh_ptr + b * s_db + i * s_dk
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        ddl = dd.to(tl.int64)
        nb = tl.load(nb_rows + ddl[None, :] * s_ed, mask=valid[:, None] & d_ok[None, :], other=0.0).to(CDT)
        hv = tl.load(h_row + ddl * s_hd, mask=d_ok, other=0.0).to(CDT)
        g = _tanh(two_minus_p * hv[None, :] + p_col * nb)
        if PUBLISHED:
            du = dgs_col * (1.0 - g * g)
        else:
            du = ds_col * nb * (1.0 - g * g)
        dhv = tl.sum(two_minus_p * du + dwn_col * nb, axis=0)
        tl.store(dh_row + ddl * s_dd, dhv.to(dh_ptr.dtype.element_ty), mask=d_ok)

    tl.store(ds_ptr + e_off, ds, mask=valid)
    tl.store(dw_ptr + e_off, dw, mask=valid)
    if PUBLISHED:
        tl.store(snb_ptr + e_off, s_nb, mask=valid)
        tl.store(sg_ptr + e_off, s_g, mask=valid)


@triton.jit
def _gcr_backward_nodes_kernel(
    dm_ptr, h_ptr, e_ptr, de_ptr, order_ptr, nodes_ptr, run_ptr, bounds_ptr, has_ptr,
    p_ptr, att_ptr, ds_ptr, dw_ptr, snb_ptr, sg_ptr,
    K, L, D, k, NCH,
    s_gb, s_gk, s_gd,
    s_hb, s_hk, s_hd,
    s_eb, s_el, s_ed,
    s_db, s_dl, s_dd,
    SUB: tl.constexpr, ZROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    PUBLISHED: tl.constexpr, CDT: tl.constexpr,
):
    """de[b, l, d0:d0 + BLOCK_D]: row l sums C_ij over the edges (i, j) with idx_ij = l,

        dNb_ij = a_ij dM_i + p_ij du_ij + (published: ds_ij G_ij 1 ; dot: ds_ij g_ij)
        C_ij   = dNb_ij + (dw_ij / sqrt(D)) h_i            (Nb_ij = e_l, and dA_{i, l} = dw_ij)
               = a_ij dM_i + (dw_ij / sqrt(D)) h_i + p_ij du_ij + (published: ds_ij G_ij 1 ;
                 dot: ds_ij g_ij),   du_ij = (published: ds_ij S_ij ; dot: ds_ij e_l) (1 - g_ij^2),
        g_ij = tanh((2 - p_ij) h_i + p_ij e_l),

    with ds, dw, S, G from `_gcr_backward_rows_kernel`. One class row selects a node at most
    once, so a node collects at most K terms.

    Grid (D chunks, NCH edge chunks + cdiv(L, ZROWS) zero-row blocks, B). The work follows the
    EDGES, not the node rows, so it stays balanced whatever the edge distribution (at the start
    of training every class row picks the same k nodes): the per-image edge list, sorted by node
    (positions of (order, nodes); run = the index of the node's run), is cut into NCH chunks, and
    chunk c owns the node runs that START in it, edges bounds[c] .. bounds[c + 1] - 1. A run
    has at most K edges (a class row selects a node once), so no program walks more than
    SEG + K - 1 edges for a mean of SEG. The edges are taken SUB at a time: a one-hot
    [SUB runs, SUB edges] tl.dot (exact products, fixed order) sums the [SUB, BLOCK_D] tile of C
    into its runs, a run cut by the sub-chunk boundary carries its partial sum into the next
    one, and each finished run is stored to its row once. The zero-row programs write zeros
    to the rows nobody selected (has = 0). Every row has one writer: deterministic, no atomics.
    """
    pid = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    dd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    ddl = dd.to(tl.int64)
    de_b = de_ptr + b * s_db + ddl[None, :] * s_dd
    if pid >= NCH:
        rows = (pid - NCH) * ZROWS + tl.arange(0, ZROWS)
        row_ok = rows < L
        has = tl.load(has_ptr + b * L + rows, mask=row_ok, other=1)
        zero = tl.zeros([ZROWS, BLOCK_D], dtype=de_ptr.dtype.element_ty)
        tl.store(de_b + rows.to(tl.int64)[:, None] * s_dl, zero, mask=(row_ok & (has == 0))[:, None] & d_ok[None, :])
    else:
        lo = tl.load(bounds_ptr + b * (NCH + 1) + pid)
        hi = tl.load(bounds_ptr + b * (NCH + 1) + pid + 1)
        edge_base = b * K * k
        ranks = tl.arange(0, SUB)
        carry = tl.zeros([BLOCK_D], dtype=CDT)
        for s0 in range(lo, hi, SUB):
            pos = s0 + ranks
            s_ok = pos < hi
            f = tl.load(order_ptr + edge_base + pos, mask=s_ok, other=0)
            node = tl.load(nodes_ptr + edge_base + pos, mask=s_ok, other=-1)
            run0 = tl.load(run_ptr + edge_base + s0)
            rank = tl.where(s_ok, tl.load(run_ptr + edge_base + pos, mask=s_ok, other=0) - run0, SUB)
            i = f // k
            eid = edge_base + f
            p = tl.load(p_ptr + eid, mask=s_ok, other=0.0)
            att = tl.load(att_ptr + eid, mask=s_ok, other=0.0)
            ds = tl.load(ds_ptr + eid, mask=s_ok, other=0.0)
            dw = tl.load(dw_ptr + eid, mask=s_ok, other=0.0)
            sqrt_d = tl.sqrt(tl.zeros([SUB], dtype=CDT) + D)
            tile_ok = s_ok[:, None] & d_ok[None, :]
            ev = tl.load(e_ptr + b * s_eb + node.to(tl.int64)[:, None] * s_el + ddl[None, :] * s_ed,
                         mask=tile_ok, other=0.0).to(CDT)
            hv = tl.load(h_ptr + b * s_hb + i[:, None] * s_hk + ddl[None, :] * s_hd, mask=tile_ok, other=0.0).to(CDT)
            gv = tl.load(dm_ptr + b * s_gb + i[:, None] * s_gk + ddl[None, :] * s_gd, mask=tile_ok, other=0.0).to(CDT)
            g = _tanh((2.0 - p)[:, None] * hv + p[:, None] * ev)
            c = att[:, None] * gv + (dw / sqrt_d)[:, None] * hv
            if PUBLISHED:
                snb = tl.load(snb_ptr + eid, mask=s_ok, other=0.0)
                sg = tl.load(sg_ptr + eid, mask=s_ok, other=0.0)
                c += (ds * sg)[:, None] + (p * ds * snb)[:, None] * (1.0 - g * g)
            else:
                c += ds[:, None] * g + (p * ds)[:, None] * ev * (1.0 - g * g)
            c = tl.where(tile_ok, c, 0.0)
            hit = rank[None, :] == ranks[:, None]  # [runs, edges]
            acc = tl.dot(tl.where(hit, 1.0, 0.0).to(CDT), c, input_precision="ieee", out_dtype=CDT)
            acc += tl.where(ranks[:, None] == 0, carry[None, :], 0.0)
            last = tl.max(tl.where(s_ok, rank, -1), axis=0)
            nxt = s0 + SUB
            cont = tl.load(run_ptr + edge_base + nxt, mask=nxt < hi, other=-1) == run0 + last
            run_node = tl.max(tl.where(hit, node[None, :], -1), axis=1)
            done = (ranks <= last) & ((ranks != last) | ~cont)
            tl.store(de_b + run_node.to(tl.int64)[:, None] * s_dl, acc.to(de_ptr.dtype.element_ty),
                     mask=done[:, None] & d_ok[None, :])
            carry = tl.where(cont, tl.sum(tl.where(ranks[:, None] == last, acc, 0.0), axis=0), 0.0)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _interpreted(t: torch.Tensor) -> bool:
    return _launch_interpreted(t.device)


_ROW_WARPS = 8  # per-row kernels: a 2048-element tile is 8 elements per thread


def _row_blocks(k: int, d: int, interp: bool) -> tuple[int, int]:
    """(KPAD, BLOCK_D) for the per-row kernels: a [KPAD, BLOCK_D] tile of <= 2048 elements on
    a GPU (compiled for sm_90 with triton 3.8: <= 128 registers a thread at 8 warps, no spills
    for k <= 64; 4096-element tiles needed 160-255 and spilled at k = 40); larger tiles under
    the interpreter (fewer Python steps)."""
    kpad = max(16, triton.next_power_of_2(k))
    tile = 16384 if interp else 2048
    block_d = max(16, min(triton.next_power_of_2(max(d, 1)), tile // kpad))
    return kpad, block_d


def _logits_blocks(interp: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the logits kernel (4 warps)."""
    return 16, (128 if interp else 64), (64 if interp else 32)


def _topk_block(nodes: int, interp: bool) -> int:
    """BLOCK_L of the top-k kernel (one warp): the whole row up to 1024 logits on a GPU."""
    return max(16, min(triton.next_power_of_2(nodes), 4096 if interp else 1024))


_LOGITS_WARPS, _TOPK_WARPS, _NODE_WARPS, _NODE_STAGES = 4, 1, 8, 1


def _forward(h: torch.Tensor, e: torch.Tensor, k: int, score: str, block_l: int | None = None):
    """Launch the forward on validated inputs: (M in h's dtype, idx int32, p, a) with
    idx, p, a of shape B x K x k (p, a in the compute dtype). block_l (a power of two >= 16)
    overrides the top-k tile (tests use it to force the multi-tile merge)."""
    bsz, ncls, d = h.shape
    nodes = e.shape[1]
    cdt = _compute_dtype(h.dtype)
    m = torch.empty((bsz, ncls, d), dtype=h.dtype, device=h.device)
    idx = torch.empty((bsz, ncls, k), dtype=torch.int32, device=h.device)
    p = torch.empty((bsz, ncls, k), dtype=cdt, device=h.device)
    att = torch.empty((bsz, ncls, k), dtype=cdt, device=h.device)
    if bsz * ncls == 0:
        return m, idx, p, att
    if d == 0:  # nothing to aggregate; the neighbour choice is arbitrary (all logits equal)
        m.zero_()
        idx.copy_(torch.arange(k, dtype=torch.int32, device=h.device).expand_as(idx))
        p.fill_(1.0 / k)
        att.fill_(1.0 / k)
        return m, idx, p, att
    interp = _interpreted(h)
    logits = torch.empty((bsz, ncls, nodes), dtype=cdt, device=h.device)
    upcast, precision = _dot_config(h.dtype, h.device, F32_DOT, compute=cdt)
    block_m, block_n, block_k = _logits_blocks(interp)
    kpad, block_d = _row_blocks(k, d, interp)
    if block_l is None:
        block_l = _topk_block(nodes, interp)
    with _device_ctx(h):
        _gcr_logits_kernel[(bsz, triton.cdiv(ncls, block_m), triton.cdiv(nodes, block_n))](
            h, e, logits,
            ncls, nodes, d,
            *h.stride(), *e.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            UPCAST=upcast, PRECISION=precision, CDT=_tl_dtype(h.dtype),
            num_warps=_LOGITS_WARPS,
        )
        _gcr_topk_kernel[(bsz * ncls,)](
            logits, idx, p,
            nodes, k,
            KPAD=kpad, BLOCK_L=block_l,
            num_warps=_TOPK_WARPS,
        )
        _gcr_aggregate_kernel[(bsz * ncls,)](
            h, e, m, idx, p, att,
            ncls, d, k,
            *h.stride(), *e.stride(), *m.stride(),
            KPAD=kpad, BLOCK_D=block_d,
            PUBLISHED=score == "published", CDT=_tl_dtype(h.dtype),
            num_warps=_ROW_WARPS,
        )
    return m, idx, p, att


def _node_config(ncls: int, d: int, interp: bool) -> tuple[int, int, int, int, int]:
    """(SUB, SEG, BLOCK_D, ZROWS, num_warps) of the backward node kernel.

    SEG (edges per chunk) is a multiple of SUB and at least K, so a program walks at most
    SEG + K - 1 <= 2 SEG edges. D is on the grid (BLOCK_D columns per program, the D chunks of one
    edge chunk side by side: they share its per-edge scalars in L2). 8 warps: at 4 the [SUB,
    BLOCK_D] tiles take 230 registers with triton 3.6 (128 at 8; no spills either way, sm_80 /
    sm_90, triton 3.6 / 3.8). num_stages=1: software pipelining of the sub-chunk loop spilled on
    sm_90 (the previous kernel, same dot)."""
    sub = 64 if interp else 32
    seg = sub * max(2, triton.cdiv(ncls, sub))
    block_d = max(16, min(triton.next_power_of_2(d), 256 if interp else 32))
    return sub, seg, block_d, 64, _NODE_WARPS


def _backward(grad_m, h, e, idx, p, att, k: int, score: str):
    """Launch the backward: (dh in h's dtype, de in e's dtype), both contiguous."""
    bsz, ncls, d = h.shape
    nodes = e.shape[1]
    cdt = _compute_dtype(h.dtype)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    de = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    if bsz * ncls == 0 or d == 0:
        dh.zero_()
        de.zero_()
        return dh, de
    interp = _interpreted(h)
    published = score == "published"
    kpad, block_d = _row_blocks(k, d, interp)
    ds = torch.empty((bsz, ncls, k), dtype=cdt, device=h.device)
    dw = torch.empty_like(ds)
    snb = torch.empty_like(ds) if published else ds  # unused for "dot"
    sg = torch.empty_like(ds) if published else ds
    # the inverted index map: per image, flat edge ids i k + j grouped by node, ascending
    edges = ncls * k
    flat = idx.reshape(bsz, edges)
    sorted_nodes, order = torch.sort(flat, dim=1, stable=True)
    first = torch.ones_like(sorted_nodes, dtype=torch.bool)
    first[:, 1:] = sorted_nodes[:, 1:] != sorted_nodes[:, :-1]
    run = torch.cumsum(first, dim=1, dtype=torch.int32) - 1  # each edge's node run
    sub, seg, block_d_nodes, zrows, warps = _node_config(ncls, d, interp)
    nch = triton.cdiv(edges, seg)
    # chunk c owns the runs starting in [c seg, (c + 1) seg): its edges run from the first run
    # start at or after c seg to the first at or after (c + 1) seg
    pos = torch.arange(edges, device=h.device).expand(bsz, edges)
    next_start = torch.where(first, pos, edges).flip(1).cummin(1).values.flip(1)
    next_start = torch.cat([next_start, next_start.new_full((bsz, 1), edges)], dim=1)
    cuts = (torch.arange(nch + 1, device=h.device) * seg).clamp(max=edges)
    bounds = next_start[:, cuts].to(torch.int32).contiguous()  # B x (NCH + 1)
    has = torch.zeros((bsz, nodes), dtype=torch.int8, device=h.device)
    has.scatter_(1, flat.long(), 1)
    with _device_ctx(h):
        _gcr_backward_rows_kernel[(bsz * ncls,)](
            grad_m, h, e, idx, p, att,
            dh, ds, dw, snb, sg,
            ncls, d, k,
            *grad_m.stride(), *h.stride(), *e.stride(), *dh.stride(),
            KPAD=kpad, BLOCK_D=block_d,
            PUBLISHED=published, CDT=_tl_dtype(h.dtype),
            num_warps=_ROW_WARPS,
        )
        _gcr_backward_nodes_kernel[(triton.cdiv(d, block_d_nodes), nch + triton.cdiv(nodes, zrows), bsz)](
            grad_m, h, e, de, order, sorted_nodes, run, bounds, has,
            p, att, ds, dw, snb, sg,
            ncls, nodes, d, k, nch,
            *grad_m.stride(), *h.stride(), *e.stride(), *de.stride(),
            SUB=sub, ZROWS=zrows, BLOCK_D=block_d_nodes,
            PUBLISHED=published, CDT=_tl_dtype(h.dtype),
            num_warps=warps, num_stages=_NODE_STAGES,
        )
    return dh, de


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("more_fast::gcr_aggregate", mutates_args=())
def _gcr_aggregate_op(
    h: torch.Tensor, e: torch.Tensor, k: int, score: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, idx, p, a): M is the op's value; idx, p, a are saved for the backward."""
    return _forward(h, e, k, score)


@_gcr_aggregate_op.register_fake
def _(h, e, k, score):
    bsz, ncls, d = h.shape
    cdt = _compute_dtype(h.dtype)
    return (
        h.new_empty((bsz, ncls, d)),
        h.new_empty((bsz, ncls, k), dtype=torch.int32),
        h.new_empty((bsz, ncls, k), dtype=cdt),
        h.new_empty((bsz, ncls, k), dtype=cdt),
    )


@torch.library.custom_op("more_fast::gcr_aggregate_backward", mutates_args=())
def _gcr_aggregate_backward_op(
    grad_m: torch.Tensor, h: torch.Tensor, e: torch.Tensor, idx: torch.Tensor,
    p: torch.Tensor, att: torch.Tensor, k: int, score: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_m, h, e, idx, p, att, k, score)


@_gcr_aggregate_backward_op.register_fake
def _(grad_m, h, e, idx, p, att, k, score):
    return h.new_empty(h.shape), e.new_empty(e.shape)


def _setup_context(ctx, inputs, output):
    h, e, k, score = inputs
    _, idx, p, att = output
    ctx.save_for_backward(h, e, idx, p, att)
    ctx.k = k
    ctx.score = score
    ctx.mark_non_differentiable(idx, p, att)


def _autograd_backward(ctx, grad_m, grad_idx, grad_p, grad_att):
    h, e, idx, p, att = ctx.saved_tensors
    dh, de = _gcr_aggregate_backward_op(grad_m, h, e, idx, p, att, ctx.k, ctx.score)
    return dh, de, None, None


torch.library.register_autograd(
    "more_fast::gcr_aggregate", _autograd_backward, setup_context=_setup_context
)


# --------------------------------------------------------------------------------------------
# Public entry (kernels.gcr_aggregate checks the inputs and supplies the default)
# --------------------------------------------------------------------------------------------
def gcr_aggregate(h: torch.Tensor, e: torch.Tensor, k: int, score: str) -> torch.Tensor:
    """M = GCR aggregation of the class heads h (B x K x D) over the nodes e (B x L x D).

    Top-k (k neighbours per class row) of A = h e^T / sqrt(D), then the gated, score-weighted
    mean of the neighbour rows (module docstring). Returns M (B x K x D) in h's dtype;
    differentiable in h and e (deterministic backward)."""
    return _gcr_aggregate_op(h, e, int(k), str(score))[0]


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations (scripts/aot_report.py)
# --------------------------------------------------------------------------------------------
def aot_configs(case, score: str | None = None, topk_ratio: float = 0.5) -> list:
    """The kernels forward and backward launch for `case` (a kernels._launch.AotCase): contiguous
    B x K x D heads and B x (K + N) x D nodes of case.dtype (the model's two projections),
    k = int(topk_ratio K) neighbours (the default recipe), the given score (default: the op's)."""
    from ._launch import AOT_DEVICE as dev, DEFAULT_STAGES, TORCH_DTYPE, aot_kernel, op_default
    from . import gcr_aggregate as public_op  # the package's function, where the defaults are

    if score is None:
        score = op_default(public_op, "score")

    b, ncls, d = case.B, case.K, case.D
    nodes = ncls + case.N
    k = max(1, int(topk_ratio * ncls))
    dt = TORCH_DTYPE[case.dtype]
    cdt = _compute_dtype(dt)
    tp, cp = "*" + case.dtype, "*" + ("fp64" if cdt == torch.float64 else "fp32")
    upcast, precision = _dot_config(dt, dev, F32_DOT, compute=cdt, cuda=True)
    block_m, block_n, block_k = _logits_blocks(False)
    kpad, block_d = _row_blocks(k, d, False)
    sub, seg, block_d_nodes, zrows, node_warps = _node_config(ncls, d, False)
    published = score == "published"
    hs = dict(s_hb=ncls * d, s_hk=d, s_hd=1)
    es = dict(s_eb=nodes * d, s_el=d, s_ed=1)
    shapes = f"B{b} K{ncls} L{nodes} D{d} k{k}"
    cfg = dict(CDT=_tl_dtype(dt))
    return [
        aot_kernel("gcr_logits", _gcr_logits_kernel, dict(
            h_ptr=tp, e_ptr=tp, a_ptr=cp, K=ncls, L=nodes, D=d, **hs, **es,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast, PRECISION=precision, **cfg,
        ), _LOGITS_WARPS, DEFAULT_STAGES, shapes),
        aot_kernel("gcr_topk", _gcr_topk_kernel, dict(
            a_ptr=cp, idx_ptr="*i32", p_ptr=cp, L=nodes, k=k, KPAD=kpad, BLOCK_L=_topk_block(nodes, False),
        ), _TOPK_WARPS, DEFAULT_STAGES, shapes),
        aot_kernel("gcr_aggregate", _gcr_aggregate_kernel, dict(
            h_ptr=tp, e_ptr=tp, m_ptr=tp, idx_ptr="*i32", p_ptr=cp, att_ptr=cp, K=ncls, D=d, k=k, **hs, **es,
            s_mb=ncls * d, s_mk=d, s_md=1, KPAD=kpad, BLOCK_D=block_d, PUBLISHED=published, **cfg,
        ), _ROW_WARPS, DEFAULT_STAGES, shapes),
        aot_kernel("gcr_bwd_rows", _gcr_backward_rows_kernel, dict(
            dm_ptr=tp, h_ptr=tp, e_ptr=tp, idx_ptr="*i32", p_ptr=cp, att_ptr=cp, dh_ptr=tp, ds_ptr=cp, dw_ptr=cp,
            snb_ptr=cp, sg_ptr=cp, K=ncls, D=d, k=k, s_gb=ncls * d, s_gk=d, s_gd=1, **hs, **es,
            s_db=ncls * d, s_dk=d, s_dd=1, KPAD=kpad, BLOCK_D=block_d, PUBLISHED=published, **cfg,
        ), _ROW_WARPS, DEFAULT_STAGES, shapes),
        aot_kernel("gcr_bwd_nodes", _gcr_backward_nodes_kernel, dict(
            dm_ptr=tp, h_ptr=tp, e_ptr=tp, de_ptr=tp, order_ptr="*i64", nodes_ptr="*i32", run_ptr="*i32",
            bounds_ptr="*i32", has_ptr="*i8", p_ptr=cp, att_ptr=cp, ds_ptr=cp, dw_ptr=cp, snb_ptr=cp, sg_ptr=cp,
            K=ncls, L=nodes, D=d, k=k, NCH=triton.cdiv(ncls * k, seg),
            s_gb=ncls * d, s_gk=d, s_gd=1, **hs, **es, s_db=nodes * d, s_dl=d, s_dd=1,
            SUB=sub, ZROWS=zrows, BLOCK_D=block_d_nodes, PUBLISHED=published, **cfg,
        ), node_warps, _NODE_STAGES, shapes),
    ]
