"""Triton FlashSFA prefill backward: the row-delta kernel, dK/dV (one program per key block, walking the GQA group's
query heads itself: K/V never repeated, nothing accumulated atomically) and dQ (one program per query block).
Probabilities are recomputed from the forward's log-sum-exp; fully masked rows (lse +inf) get zero probabilities."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import cdiv
from .limits import LOG2E
from .prefill_launch import BWD_TILES, NO_MASK, launch, mask_args, shape_meta, tuned
from .triton_prefill import _key_ranges, _query_block, _score_mask

_LOG2E = tl.constexpr(LOG2E)
_NO_MASK = tl.constexpr(NO_MASK)


@triton.jit
def _bwd_delta_kernel(Out, dOut, Delta, L, DV, stride_out_b, stride_out_h, stride_out_m, stride_out_d, stride_dout_b,
                      stride_dout_h, stride_dout_m, stride_dout_d, H,
                      BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Delta = rowsum(O * dO) in float32, the softmax backward's per-row correction."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < L) & (offs[None, :] < DV)
    out_rows = b * stride_out_b + h * stride_out_h + rows[:, None] * stride_out_m
    dout_rows = b * stride_dout_b + h * stride_dout_h + rows[:, None] * stride_dout_m
    o = tl.load(Out + out_rows + offs[None, :] * stride_out_d, mask=ok, other=0.0)
    do = tl.load(dOut + dout_rows + offs[None, :] * stride_dout_d, mask=ok, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * L + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < L)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, dO, Lse, Delta, Mask, start_m, cols, offs_m, offs_d, offs_dv, L, S, D, DV, qk_scale,
               stride_q_m, stride_q_d, stride_dout_m, stride_dout_d, stride_mask_m, stride_mask_n,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = start_m + offs_m
    q_ptrs = Q + rows[:, None] * stride_q_m + offs_d[None, :] * stride_q_d
    do_ptrs = dO + rows[:, None] * stride_dout_m + offs_dv[None, :] * stride_dout_d
    if MASKED:
        q = tl.load(q_ptrs, mask=(rows[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_ptrs, mask=(rows[:, None] < L) & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(Lse + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(Delta + rows, mask=rows < L, other=0.0)
    else:
        if EVEN_D:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_d[None, :] < D, other=0.0)
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        lse = tl.load(Lse + rows)
        delta = tl.load(Delta + rows)
    # Transposed tile: keys are rows here.
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    if MASKED:
        s_t = tl.trans(_score_mask(tl.trans(s_t), rows, cols, L, S, Mask, stride_mask_m, stride_mask_n, IS_CAUSAL,
                                   MASK_KIND))
    p_t = tl.math.exp2(s_t - lse[None, :] * _LOG2E)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _flash_sfa_bwd_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, Mask, dK, dV,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b,
    stride_v_h, stride_v_n, stride_v_d,
    stride_dout_b, stride_dout_h, stride_dout_m, stride_dout_d, stride_mask_b, stride_mask_h, stride_mask_m,
    stride_mask_n,
    H, HK, G, L, S, D, DV, qk_scale, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * stride_k_b + hk * stride_k_h + cols[:, None] * stride_k_n + offs_d[None, :] * stride_k_d,
                mask=(cols[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_v_b + hk * stride_v_h + cols[:, None] * stride_v_n + offs_dv[None, :] * stride_v_d,
                mask=(cols[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query tiles: [lo, diag) cross the causal diagonal, [diag, bulk) are fully visible, [bulk, L) ragged.
    lo = 0
    diag = 0
    bulk = L // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        diag = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, bulk)
    if MASK_KIND != _NO_MASK:
        diag = L
    bulk = tl.maximum(bulk, diag)
    for g in range(G):
        h = hk * G + g
        Qh = Q + b * stride_q_b + h * stride_q_h
        dOh = dO + b * stride_dout_b + h * stride_dout_h
        Lh = Lse + (b * H + h) * L
        Dh = Delta + (b * H + h) * L
        Mh = Mask + b * stride_mask_b + h * stride_mask_h
        for start_m in range(lo, diag, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, dOh, Lh, Dh, Mh, start_m, cols, offs_m, offs_d, offs_dv,
                                L, S, D, DV, qk_scale, stride_q_m, stride_q_d, stride_dout_m, stride_dout_d,
                                stride_mask_m, stride_mask_n,
                                True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
        for start_m in range(diag, bulk, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, dOh, Lh, Dh, Mh, start_m, cols, offs_m, offs_d, offs_dv,
                                L, S, D, DV, qk_scale, stride_q_m, stride_q_d, stride_dout_m, stride_dout_d,
                                stride_mask_m, stride_mask_n,
                                False, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
        for start_m in range(bulk, L, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, dOh, Lh, Dh, Mh, start_m, cols, offs_m, offs_d, offs_dv,
                                L, S, D, DV, qk_scale, stride_q_m, stride_q_d, stride_dout_m, stride_dout_d,
                                stride_mask_m, stride_mask_n,
                                True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)

    out = (b * HK + hk) * S * D + cols[:, None] * D + offs_d[None, :]
    tl.store(dK + out, (dk * scale).to(dK.dtype.element_ty), mask=(cols[:, None] < S) & (offs_d[None, :] < D))
    out = (b * HK + hk) * S * DV + cols[:, None] * DV + offs_dv[None, :]
    tl.store(dV + out, dv.to(dV.dtype.element_ty), mask=(cols[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV, qk_scale,
             stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_m, stride_mask_n,
             MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
             EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = K + cols[:, None] * stride_k_n + offs_d[None, :] * stride_k_d
    v_ptrs = V + cols[:, None] * stride_v_n + offs_dv[None, :] * stride_v_d
    if MASKED:
        k = tl.load(k_ptrs, mask=(cols[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = _score_mask(s, rows, cols, L, S, Mask, stride_mask_m, stride_mask_n, IS_CAUSAL, MASK_KIND)
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _flash_sfa_bwd_dq_kernel(
    Q, K, V, dO, Lse, Delta, Mask, dQ,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b,
    stride_v_h, stride_v_n, stride_v_d,
    stride_dout_b, stride_dout_h, stride_dout_m, stride_dout_d, stride_mask_b, stride_mask_h, stride_mask_m,
    stride_mask_n,
    H, G, L, S, D, DV, qk_scale, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    start_m, bh, b, h, rows, offs_n, offs_d, offs_dv, q, K, V, Mask = _query_block(
        Q, K, V, Mask, stride_q_b, stride_q_h, stride_q_m, stride_q_d, stride_k_b, stride_k_h, stride_v_b, stride_v_h,
        stride_mask_b, stride_mask_h, H, G, L, D,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    row_ok = rows < L
    dout_rows = b * stride_dout_b + h * stride_dout_h + rows[:, None] * stride_dout_m
    do = tl.load(dO + dout_rows + offs_dv[None, :] * stride_dout_d,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    bulk, hi = _key_ranges(start_m, S, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    for start_n in range(0, bulk, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV,
                      qk_scale, stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_m, stride_mask_n, False,
                      IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
    for start_n in range(bulk, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV,
                      qk_scale, stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_m, stride_mask_n, True,
                      IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
    out = bh.to(tl.int64) * L * D + rows[:, None] * D + offs_d[None, :]
    tl.store(dQ + out, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


_dkdv_tuned = tuned(_flash_sfa_bwd_dkdv_kernel, BWD_TILES)
_dq_tuned = tuned(_flash_sfa_bwd_dq_kernel, BWD_TILES)


def flash_backward(d_out, q, k, v, out, lse, mask, is_causal: bool, scale: float):
    """(dq, dk, dv) of ``flash_forward`` (gradients w.r.t. the sparsified q and k), contiguous."""
    batch, heads, length, head_dim = q.shape
    key_heads, keys, value_dim = k.size(1), k.size(2), v.size(-1)
    meta = shape_meta(q, k, v, mask, is_causal)
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(cdiv(length, 32), batch * heads)](
        out, d_out, delta, length, value_dim, *out.stride(), *d_out.stride(), heads,
        BLOCK_M=32, BLOCK_DV=meta["BLOCK_DV"],
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _, mask_t, mask_strides = mask_args(mask, q)
    strides = (*q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *mask_strides)
    launch(
        _dkdv_tuned, _flash_sfa_bwd_dkdv_kernel, lambda m: (cdiv(keys, m["BLOCK_N"]), batch * key_heads),
        q, k, v, d_out, lse, delta, mask_t, dk, dv, *strides,
        heads, key_heads, heads // key_heads, length, keys, head_dim, value_dim, scale * LOG2E, scale, **meta,
    )
    launch(
        _dq_tuned, _flash_sfa_bwd_dq_kernel, lambda m: (cdiv(length, m["BLOCK_M"]), batch * heads),
        q, k, v, d_out, lse, delta, mask_t, dq, *strides,
        heads, heads // key_heads, length, keys, head_dim, value_dim, scale * LOG2E, scale, **meta,
    )
    return dq, dk, dv
