"""Fused L_cre, the LIR class-to-patch contrast loss (docs/METHOD.md, Losses), as Triton kernels.

    qn_c  = q_c / max(||q_c||, 1e-12)                  (F.normalize, default eps)
    z_cn  = <qn_c, p_n> / t                            p = patch tokens, detached, not normalized
    lse_c = log sum_n exp(z_cn)
    nll_c = mean over {n : label_n = c + 1} of (lse_c - z_cn) = lse_c - Z_c / cnt_c   (0 if cnt_c = 0)
    L     = (1 / B) sum_b sum_c [cls_labels_bc != 0] nll_bc

Gradient: the class tokens' only (the patch tokens are detached, docs/METHOD.md, Losses); its
equations are in `_lir_bwd_kernel`, beside the lines that compute them.

Forward (2 launches):
1. `_lir_logits_kernel`, grid (T, cdiv(K, BLOCK_K), B) over N tiles: z for a class block and
   an N tile (tl.dot over D chunks of the raw tokens, scaled by rq / t in fp32), stored as
   B x K x N fp32 (small: K x N per image, saved for backward), and the tile's statistics per
   class: max, sum exp(z - max), sum of z over the class's patches, their count (int32).
2. `_lir_combine_kernel`, one program: merges the tile statistics in a fixed order
   (online logsumexp, stable for any logit size), the loss, and per (b, c) the saved
   (lse, u / B, 1 / cnt).
Backward (1 launch):
3. `_lir_bwd_kernel`, grid (cdiv(D, BLOCK_DO), cdiv(K, BLOCK_K), B): e from the saved z,
   sum_n e_cn p_n by tl.dot over N tiles for one D slice, the projection from e and z, and
   dL/dq stored in the dtype of the class tokens.
Deterministic: no atomics, every reduction in a fixed order.
Saved for backward: the inputs, z (B x K x N fp32) and aux (B x K x 3 fp32).

Precision (kernels/_launch.py, the precision policy): fp16 / bf16 logits dots natively on CUDA
(exact products, fp32 accumulation); fp32 and mixed dtypes upcast to fp32 with 3xTF32 (F32_DOT),
as is the backward's e p product (e is fp32). fp64 is computed in fp32. The loss is fp32.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from ._launch import device_ctx as _device_ctx, dot_config as _dot_config, pow2_clamp as _pow2_clamp

NORM_EPS = 1e-12  # F.normalize default
# fp32 tokens (kernels/_launch.py, the precision policy): the K x N x D logits and the backward's
# K x D x N product are the op's cost, and 3xTF32 keeps them about fp32-accurate on tensor cores
F32_DOT = "tf32x3"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _lir_logits_kernel(
    q_ptr, p_ptr, lab_ptr, z_ptr, st_m_ptr, st_s_ptr, st_z_ptr, st_c_ptr,
    K, N, D, inv_t, eps, sqb, sqk, sqd, spb, spn, spd, slb, sln,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """z[b, c, n] = <q_c, p_n> rq_c / t for one N tile and class block, and per class the tile
    statistics at slot (b * K + c) * T + tile: max_n z, sum_n exp(z - max), sum of z over
    the patches labelled c + 1, and their count."""
    tn = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2)
    num_t = tl.num_programs(0)
    offs_c = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = offs_c < K
    mn = offs_n < N
    q_rows = q_ptr + b.to(tl.int64) * sqb + offs_c.to(tl.int64) * sqk
    p_rows = p_ptr + b.to(tl.int64) * spb + offs_n.to(tl.int64) * spn

    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        q = tl.load(q_rows[:, None] + offs_d[None, :].to(tl.int64) * sqd, mask=mc[:, None] & md[None, :], other=0.0)
        pt = tl.load(p_rows[None, :] + offs_d[:, None].to(tl.int64) * spd, mask=md[:, None] & mn[None, :], other=0.0)
        qf = q.to(tl.float32)
        ss += tl.sum(qf * qf, axis=1)
        if UPCAST:
            acc = tl.dot(qf, pt.to(tl.float32), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(q, pt, acc, input_precision=DOT_PREC)
    scale = inv_t / tl.maximum(tl.sqrt(ss), eps)
    z = acc * scale[:, None]

    z_rows = (b * K + offs_c).to(tl.int64) * N
    tl.store(z_ptr + z_rows[:, None] + offs_n[None, :], z, mask=mc[:, None] & mn[None, :])

    lab = tl.load(lab_ptr + b.to(tl.int64) * slb + offs_n.to(tl.int64) * sln, mask=mn, other=0).to(tl.int64)
    member = (lab[None, :] == (offs_c[:, None] + 1).to(tl.int64)) & mn[None, :]
    zm = tl.where(mn[None, :], z, float("-inf"))
    t_max = tl.max(zm, axis=1)
    t_sum = tl.sum(tl.exp(zm - t_max[:, None]), axis=1)
    t_z = tl.sum(tl.where(member, z, 0.0), axis=1)
    t_c = tl.sum(member.to(tl.int32), axis=1)
    slot = (b * K + offs_c).to(tl.int64) * num_t + tn
    tl.store(st_m_ptr + slot, t_max, mask=mc)
    tl.store(st_s_ptr + slot, t_sum, mask=mc)
    tl.store(st_z_ptr + slot, t_z, mask=mc)
    tl.store(st_c_ptr + slot, t_c, mask=mc)


@triton.jit
def _lir_combine_kernel(
    st_m_ptr, st_s_ptr, st_z_ptr, st_c_ptr, cls_ptr, loss_ptr, aux_ptr,
    B, K, T, inv_b, scb, sck,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: per (b, c) the T tile statistics merged in order (online logsumexp),
    nll = lse - Z / cnt; loss = sum over present classes with cnt > 0, times 1 / B.
    aux[b, c] = (lse, u / B, 1 / cnt) for the backward (u = present and cnt > 0)."""
    loss_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for b in range(0, B):
        for c0 in range(0, K, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mc = offs_c < K
            rows = (b * K + offs_c).to(tl.int64) * T
            run_m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
            run_s = tl.zeros([BLOCK_K], dtype=tl.float32)
            run_z = tl.zeros([BLOCK_K], dtype=tl.float32)
            run_c = tl.zeros([BLOCK_K], dtype=tl.int32)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                mask = mc[:, None] & (offs_t[None, :] < T)
                ptrs = rows[:, None] + offs_t[None, :]
                t_max = tl.load(st_m_ptr + ptrs, mask=mask, other=float("-inf"))
                t_sum = tl.load(st_s_ptr + ptrs, mask=mask, other=0.0)
                new_m = tl.maximum(run_m, tl.max(t_max, axis=1))
                new_m_safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # rows past K only
                run_s = run_s * tl.exp(run_m - new_m_safe) + tl.sum(
                    t_sum * tl.exp(t_max - new_m_safe[:, None]), axis=1
                )
                run_m = new_m
                run_z += tl.sum(tl.load(st_z_ptr + ptrs, mask=mask, other=0.0), axis=1)
                run_c += tl.sum(tl.load(st_c_ptr + ptrs, mask=mask, other=0), axis=1)
            lse = run_m + tl.log(tl.where(run_s > 0, run_s, 1.0))  # -inf for rows with no patch
            has = run_c > 0
            cnt = tl.maximum(run_c, 1).to(tl.float32)
            present = tl.load(cls_ptr + b * scb + offs_c.to(tl.int64) * sck, mask=mc, other=0) != 0
            use = present & has & mc
            loss_acc += tl.where(use, lse - run_z / cnt, 0.0)
            aux = (b * K + offs_c).to(tl.int64) * 3
            tl.store(aux_ptr + aux, lse, mask=mc)
            tl.store(aux_ptr + aux + 1, tl.where(use, inv_b, 0.0), mask=mc)
            tl.store(aux_ptr + aux + 2, tl.where(has, 1.0 / cnt, 0.0), mask=mc)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) * inv_b)


@triton.jit
def _lir_bwd_kernel(
    q_ptr, p_ptr, lab_ptr, z_ptr, aux_ptr, gout_ptr, dq_ptr,
    K, N, D, inv_t, eps, sqb, sqk, sqd, spb, spn, spd, slb, sln,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_DQ: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dL/dq for one D slice of a class block (contiguous B x K x D, the dtype of q). With
    g the upstream gradient, u_bc = [present and cnt_bc > 0] and w = u / B (aux, saved):

        e_cn      = g w_c (softmax_n(z_c)_n - [label_n = c + 1] / cnt_c)      (= g dL/dz_cn)
        dL/dqn_c  = (1 / t) sum_n e_cn p_n                                    (`acc` inv_t)
        <qn_c, dL/dqn_c> = sum_n e_cn z_cn = sum_n e_cn (z_cn - lse_c)        (`proj`; sum_n e_cn = 0)
        dL/dq_c   = rq (dL/dqn_c - [||q_c|| >= eps] rq q_c <qn_c, dL/dqn_c>),  rq = 1 / max(||q_c||, eps)
    """
    ds = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2)
    go = tl.load(gout_ptr).to(tl.float32)
    offs_c = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mc = offs_c < K
    offs_do = ds * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdo = offs_do < D
    aux = (b * K + offs_c).to(tl.int64) * 3
    lse = tl.load(aux_ptr + aux, mask=mc, other=0.0)
    w = tl.load(aux_ptr + aux + 1, mask=mc, other=0.0) * go
    inv_cnt = tl.load(aux_ptr + aux + 2, mask=mc, other=0.0)
    z_rows = (b * K + offs_c).to(tl.int64) * N
    p_rows = p_ptr + b.to(tl.int64) * spb
    q_rows = q_ptr + b.to(tl.int64) * sqb + offs_c.to(tl.int64) * sqk

    # the stored lse is rounded to ~eps |lse|: renormalize exp(z - lse) so that the softmax sums
    # to 1 in fp32 and sum_n e_n is 0 to rounding (else (sum e) times the tokens' common
    # direction leaks into G)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        zmask = mc[:, None] & (offs_n < N)[None, :]
        z = tl.load(z_ptr + z_rows[:, None] + offs_n[None, :], mask=zmask, other=0.0)
        total += tl.sum(tl.exp(tl.where(zmask, z - lse[:, None], float("-inf"))), axis=1)
    inv_total = 1.0 / tl.where(mc, total, 1.0)

    acc = tl.zeros([BLOCK_K, BLOCK_DO], dtype=tl.float32)
    proj = tl.zeros([BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        zmask = mc[:, None] & mn[None, :]
        z = tl.load(z_ptr + z_rows[:, None] + offs_n[None, :], mask=zmask, other=0.0)
        prob = tl.exp(tl.where(zmask, z - lse[:, None], float("-inf"))) * inv_total[:, None]
        lab = tl.load(lab_ptr + b.to(tl.int64) * slb + offs_n.to(tl.int64) * sln, mask=mn, other=0).to(tl.int64)
        member = lab[None, :] == (offs_c[:, None] + 1).to(tl.int64)
        e = w[:, None] * (prob - tl.where(member, inv_cnt[:, None], 0.0))
        e = tl.where(zmask, e, 0.0)
        proj += tl.sum(e * z, axis=1)  # <qn, G> t = sum_n e_n z_n
        pt = tl.load(
            p_rows + offs_n[:, None].to(tl.int64) * spn + offs_do[None, :].to(tl.int64) * spd,
            mask=mn[:, None] & mdo[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(e, pt, acc, input_precision=DOT_PREC)

    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DQ):
        offs_d = d0 + tl.arange(0, BLOCK_DQ)
        q = tl.load(q_rows[:, None] + offs_d[None, :].to(tl.int64) * sqd,
                    mask=mc[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        ss += tl.sum(q * q, axis=1)
    norm = tl.sqrt(ss)
    rq = 1.0 / tl.maximum(norm, eps)
    coef = tl.where(norm >= eps, rq * rq * proj, 0.0)
    q = tl.load(q_rows[:, None] + offs_do[None, :].to(tl.int64) * sqd,
                mask=mc[:, None] & mdo[None, :], other=0.0).to(tl.float32)
    dq = rq[:, None] * (acc * inv_t) - coef[:, None] * q
    dq_rows = (b * K + offs_c).to(tl.int64) * D
    tl.store(dq_ptr + dq_rows[:, None] + offs_do[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=mc[:, None] & mdo[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _config(device: torch.device, k: int, n: int, d: int) -> dict:
    """Block sizes (tests override this to exercise multi-tile paths)."""
    block_k = _pow2_clamp(k, 16, 64)
    if device.type == "cuda":
        # block_t 16: the one-program statistics merge spilled at 64 (255 registers, 96-332 bytes on
        # sm_80 / sm_90 with triton 3.6 and 3.8; 64 registers at 16)
        # bwd_block_n 16: the backward's N tiles (z, e and the [N, BLOCK_DO] patch tile) at 64 wide
        # took 255 registers at K = 80 and spilled 1-1.4 KB on sm_80; 16 wide: <= 168, none
        return dict(block_k=block_k, block_n=64, block_d=32, block_do=64, block_t=16, bwd_block_n=16, num_warps=4,
                    num_stages=3)
    # interpreter: each program costs ~10 ms of Python, so few large blocks
    return dict(block_k=block_k, block_n=_pow2_clamp(n, 16, 256), block_d=_pow2_clamp(d, 16, 256),
                block_do=_pow2_clamp(d, 16, 256), block_t=64, bwd_block_n=_pow2_clamp(n, 16, 256), num_warps=4,
                num_stages=1)


_COMBINE_WARPS = 4


def _lir_forward(cls_tokens, patch_tokens, labels, cls_labels, temperature: float):
    """(loss fp32 scalar, z fp32 B x K x N, aux fp32 B x K x 3) of validated inputs."""
    b, k, d = cls_tokens.shape
    n = patch_tokens.shape[1]
    dev = cls_tokens.device
    cfg = _config(dev, k, n, d)
    upcast, prec = _dot_config((cls_tokens.dtype, patch_tokens.dtype), dev, F32_DOT)
    t = triton.cdiv(n, cfg["block_n"])
    z = torch.empty((b, k, n), dtype=torch.float32, device=dev)
    st_m = torch.empty((b, k, t), dtype=torch.float32, device=dev)
    st_s = torch.empty((b, k, t), dtype=torch.float32, device=dev)
    st_z = torch.empty((b, k, t), dtype=torch.float32, device=dev)
    st_c = torch.empty((b, k, t), dtype=torch.int32, device=dev)
    aux = torch.empty((b, k, 3), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    with _device_ctx(cls_tokens):
        if b * k * t > 0:  # otherwise every class has no patch: the loss is 0
            _lir_logits_kernel[(t, triton.cdiv(k, cfg["block_k"]), b)](
                cls_tokens, patch_tokens, labels, z, st_m, st_s, st_z, st_c,
                k, n, d, 1.0 / temperature, NORM_EPS, *cls_tokens.stride(), *patch_tokens.stride(), *labels.stride(),
                BLOCK_K=cfg["block_k"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], UPCAST=upcast, DOT_PREC=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        _lir_combine_kernel[(1,)](
            st_m, st_s, st_z, st_c, cls_labels, loss, aux, b, k, t, 1.0 / b if b else float("nan"), *cls_labels.stride(),
            BLOCK_K=cfg["block_k"], BLOCK_T=cfg["block_t"], num_warps=_COMBINE_WARPS,
        )
    return loss, z, aux


def _lir_backward(grad, cls_tokens, patch_tokens, labels, z, aux, temperature: float) -> torch.Tensor:
    """dL/dcls_tokens (contiguous, the dtype of cls_tokens) for the upstream scalar gradient."""
    b, k, d = cls_tokens.shape
    n = patch_tokens.shape[1]
    dev = cls_tokens.device
    cfg = _config(dev, k, n, d)
    dq = torch.empty((b, k, d), dtype=cls_tokens.dtype, device=dev)
    if dq.numel() == 0:
        return dq
    grad = grad.reshape(()).to(device=dev)
    with _device_ctx(cls_tokens):
        _lir_bwd_kernel[(triton.cdiv(d, cfg["block_do"]), triton.cdiv(k, cfg["block_k"]), b)](
            cls_tokens, patch_tokens, labels, z, aux, grad, dq,
            k, n, d, 1.0 / temperature, NORM_EPS, *cls_tokens.stride(), *patch_tokens.stride(), *labels.stride(),
            BLOCK_K=cfg["block_k"], BLOCK_N=cfg["bwd_block_n"], BLOCK_DO=cfg["block_do"], BLOCK_DQ=cfg["block_d"],
            DOT_PREC=_dot_config(torch.float32, dev, F32_DOT)[1], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return dq


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("more_fast::lir_loss", mutates_args=())
def _lir_loss_op(
    cls_tokens: torch.Tensor, patch_tokens: torch.Tensor, labels: torch.Tensor, cls_labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lir_forward(cls_tokens, patch_tokens, labels, cls_labels, temperature)


@_lir_loss_op.register_fake
def _(cls_tokens, patch_tokens, labels, cls_labels, temperature):
    b, k, _ = cls_tokens.shape
    n = patch_tokens.shape[1]
    return (
        cls_tokens.new_empty((), dtype=torch.float32),
        cls_tokens.new_empty((b, k, n), dtype=torch.float32),
        cls_tokens.new_empty((b, k, 3), dtype=torch.float32),
    )


@torch.library.custom_op("more_fast::lir_loss_backward", mutates_args=())
def _lir_loss_bwd_op(
    grad: torch.Tensor, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor, labels: torch.Tensor,
    z: torch.Tensor, aux: torch.Tensor, temperature: float,
) -> torch.Tensor:
    return _lir_backward(grad, cls_tokens, patch_tokens, labels, z, aux, temperature)


@_lir_loss_bwd_op.register_fake
def _(grad, cls_tokens, patch_tokens, labels, z, aux, temperature):
    return torch.empty(cls_tokens.shape, dtype=cls_tokens.dtype, device=cls_tokens.device)


def _setup_context(ctx, inputs, output):
    cls_tokens, patch_tokens, labels, _, temperature = inputs
    _, z, aux = output
    ctx.save_for_backward(cls_tokens, patch_tokens, labels, z, aux)
    ctx.temperature = temperature


def _backward(ctx, grad_loss, grad_z, grad_aux):
    cls_tokens, patch_tokens, labels, z, aux = ctx.saved_tensors
    grad_cls = None
    if ctx.needs_input_grad[0]:
        grad_cls = _lir_loss_bwd_op(grad_loss, cls_tokens, patch_tokens, labels, z, aux, ctx.temperature)
    # patch tokens are detached in L_cre (docs/METHOD.md, Losses): no gradient
    return grad_cls, None, None, None, None


torch.library.register_autograd("more_fast::lir_loss", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry (kernels.lir_loss checks the inputs)
# --------------------------------------------------------------------------------------------
def lir_loss(
    cls_tokens: torch.Tensor,
    patch_tokens: torch.Tensor,
    labels: torch.Tensor,
    cls_labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """L_cre (docs/METHOD.md, Losses): B x K x D class tokens, B x N x D patch tokens (no gradient), B x N
    labels, B x K {0, 1} image labels -> an fp32 scalar."""
    return _lir_loss_op(cls_tokens, patch_tokens, labels, cls_labels, float(temperature))[0]


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations (scripts/aot_report.py)
# --------------------------------------------------------------------------------------------
def aot_configs(case) -> list:
    """The kernels forward and backward launch for `case` (a kernels._launch.AotCase): B x K x D
    class tokens and B x N x D patch tokens of case.dtype as the model hands them (the patch
    tokens a slice of the B x T x D token tensor), int64 labels, fp32 image labels."""
    from ._launch import AOT_DEVICE as dev, DEFAULT_STAGES, TORCH_DTYPE, aot_kernel

    b, k, n, d = case.B, case.K, case.N, case.D
    tp = "*" + case.dtype
    upcast, prec = _dot_config(TORCH_DTYPE[case.dtype], dev, F32_DOT, cuda=True)
    prec_f32 = _dot_config(torch.float32, dev, F32_DOT, cuda=True)[1]
    cfg = _config(dev, k, n, d)
    t = triton.cdiv(n, cfg["block_n"])
    common = dict(K=k, N=n, D=d, inv_t=2.0, eps=NORM_EPS, sqb=k * d, sqk=d, sqd=1, spb=case.T * d, spn=d, spd=1,
                  slb=n, sln=1)
    shapes = f"B{b} K{k} N{n} D{d}"
    return [
        aot_kernel("lir_logits", _lir_logits_kernel, dict(
            q_ptr=tp, p_ptr=tp, lab_ptr="*i64", z_ptr="*fp32", st_m_ptr="*fp32", st_s_ptr="*fp32",
            st_z_ptr="*fp32", st_c_ptr="*i32", **common,
            BLOCK_K=cfg["block_k"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], UPCAST=upcast, DOT_PREC=prec,
        ), cfg["num_warps"], cfg["num_stages"], shapes),
        aot_kernel("lir_combine", _lir_combine_kernel, dict(
            st_m_ptr="*fp32", st_s_ptr="*fp32", st_z_ptr="*fp32", st_c_ptr="*i32", cls_ptr="*fp32",
            loss_ptr="*fp32", aux_ptr="*fp32", B=b, K=k, T=t, inv_b=1.0 / b, scb=k, sck=1,
            BLOCK_K=cfg["block_k"], BLOCK_T=cfg["block_t"],
        ), _COMBINE_WARPS, DEFAULT_STAGES, shapes),
        aot_kernel("lir_bwd", _lir_bwd_kernel, dict(
            q_ptr=tp, p_ptr=tp, lab_ptr="*i64", z_ptr="*fp32", aux_ptr="*fp32", gout_ptr="*fp32", dq_ptr=tp,
            **common, BLOCK_K=cfg["block_k"], BLOCK_N=cfg["bwd_block_n"], BLOCK_DO=cfg["block_do"],
            BLOCK_DQ=cfg["block_d"], DOT_PREC=prec_f32,
        ), cfg["num_warps"], cfg["num_stages"], shapes),
    ]
