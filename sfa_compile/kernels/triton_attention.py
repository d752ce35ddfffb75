"""Triton flash attention over top-k-sparsified queries and keys: the FlashSFA prefill forward and backward.

Inputs are 4-D (batch, heads, length, features) with any strides (stride 0 broadcasts a batch or head);
queries and keys arrive already sparsified (zeros outside the top-k, see ``triton_topk``), so the score
tile ``q~ k~^T`` runs on tensor cores at dense speed and no L x S matrix ever reaches memory. Why not skip
the zeros: within a 64-128 row tile the union of kept features covers nearly every coordinate, and a
CUDA-core sparse dot loses to the tensor-core dense one for topk >= 8 (DESIGN.md section 4).

Masks: top-left causal is computed from indices; a general mask (boolean keep or additive float, any
broadcast) is loaded tile by tile (the slower path). GQA maps query head h to key head h // group; the
dK/dV kernel walks the group's query heads itself, so K/V are never repeated and nothing is atomically
accumulated. Fully masked rows give zero output and a log-sum-exp of +inf, which makes their
probabilities zero in the backward.

Each loop over tiles is split into an unmasked bulk and masked edges (causal diagonal, ragged ends, mask
tiles) so the bulk pays for no index arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import cdiv
from .triton_topk import autotuning, feature_block, interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _score_mask(qk, rows, cols, L, S, Mask, sm_m, sm_n, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply bounds, causal and the user mask to a [rows, cols] tile of base-2 scores."""
    valid = (cols[None, :] < S) & (rows[:, None] < L)
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if MASK_KIND == 1:
        keep = tl.load(Mask + rows[:, None] * sm_m + cols[None, :] * sm_n, mask=valid, other=0)
        valid = valid & (keep != 0)
    if MASK_KIND == 2:
        add = tl.load(Mask + rows[:, None] * sm_m + cols[None, :] * sm_n, mask=valid, other=0.0)
        qk = qk + add.to(tl.float32) * 1.4426950408889634
    return tl.where(valid, qk, float("-inf"))


@triton.jit
def _key_ranges(start_m, S, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(bulk, hi) for the query rows starting at start_m: key tiles [0, bulk) need no mask (inside [0, S)
    and, if causal, left of every row's diagonal); [bulk, hi) are masked; keys from hi on are invisible."""
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
    bulk = 0
    if MASK_KIND == 0:
        bulk = S // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            bulk = tl.minimum(bulk, (start_m + 1) // BLOCK_N * BLOCK_N)
    return bulk, hi


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV, qk_scale,
              sk_n, sk_d, sv_n, sv_d, sm_m, sm_n,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = K + offs_d[:, None] * sk_d + cols[None, :] * sk_n
    v_ptrs = V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d
    if MASKED:
        k = tl.load(k_ptrs, mask=(offs_d[:, None] < D) & (cols[None, :] < S), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
    qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = _score_mask(qk, rows, cols, L, S, Mask, sm_m, sm_n, IS_CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _query_block(Q, K, V, Mask, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sv_b, sv_h, sm_b, sm_h, H, G, L, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Prologue shared by the kernels that own a block of query rows (forward, dQ): the block (heaviest causal
    blocks first: they would finish last otherwise), its batch/head, offsets, the q tile, and K/V/Mask moved
    to this head."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=(rows[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    return (start_m, bh, b, h, rows, tl.arange(0, BLOCK_N), offs_d, tl.arange(0, BLOCK_DV), q,
            K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h, Mask + b * sm_b + h * sm_h)


@triton.jit
def _flash_sfa_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sm_b, sm_h, sm_m, sm_n, so_b, so_h, so_m, so_d,
    H, G, L, S, D, DV, qk_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    start_m, bh, b, h, rows, offs_n, offs_d, offs_dv, q, K, V, Mask = _query_block(
        Q, K, V, Mask, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sv_b, sv_h, sm_b, sm_h, H, G, L, D,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    bulk, hi = _key_ranges(start_m, S, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    for start_n in range(0, bulk, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv,
                                  L, S, D, DV, qk_scale, sk_n, sk_d, sv_n, sv_d, sm_m, sm_n,
                                  False, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
    for start_n in range(bulk, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv,
                                  L, S, D, DV, qk_scale, sk_n, sk_d, sv_n, sv_d, sm_m, sm_n,
                                  True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)

    empty = l_i == 0.0  # every key masked: output 0, lse +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_m + offs_dv[None, :] * so_d, out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < L) & (offs_dv[None, :] < DV))
    tl.store(Lse + bh.to(tl.int64) * L + rows, lse, mask=rows < L)


# -------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(Out, dOut, Delta, L, DV, so_b, so_h, so_m, so_d, sd_b, sd_h, sd_m, sd_d, H,
                      BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Delta = rowsum(O * dO) in float32, the softmax backward's per-row correction."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < L) & (offs[None, :] < DV)
    o = tl.load(Out + b * so_b + h * so_h + rows[:, None] * so_m + offs[None, :] * so_d, mask=ok, other=0.0)
    do = tl.load(dOut + b * sd_b + h * sd_h + rows[:, None] * sd_m + offs[None, :] * sd_d, mask=ok, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * L + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < L)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, dO, Lse, Delta, Mask, start_m, cols, offs_m, offs_d, offs_dv, L, S, D, DV, qk_scale,
               sq_m, sq_d, sd_m, sd_d, sm_m, sm_n,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = start_m + offs_m
    q_ptrs = Q + rows[:, None] * sq_m + offs_d[None, :] * sq_d
    do_ptrs = dO + rows[:, None] * sd_m + offs_dv[None, :] * sd_d
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
        s_t = tl.trans(_score_mask(tl.trans(s_t), rows, cols, L, S, Mask, sm_m, sm_n, IS_CAUSAL, MASK_KIND))
    p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _flash_sfa_bwd_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, Mask, dK, dV,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sd_b, sd_h, sd_m, sd_d, sm_b, sm_h, sm_m, sm_n,
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
    k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=(cols[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_n + offs_dv[None, :] * sv_d,
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
    if MASK_KIND != 0:
        diag = L
    bulk = tl.maximum(bulk, diag)
    for g in range(G):
        h = hk * G + g
        Qh = Q + b * sq_b + h * sq_h
        dOh = dO + b * sd_b + h * sd_h
        Lh = Lse + (b * H + h) * L
        Dh = Delta + (b * H + h) * L
        Mh = Mask + b * sm_b + h * sm_h
        for start_m in range(lo, diag, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, dOh, Lh, Dh, Mh, start_m, cols, offs_m, offs_d, offs_dv,
                                L, S, D, DV, qk_scale, sq_m, sq_d, sd_m, sd_d, sm_m, sm_n,
                                True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
        for start_m in range(diag, bulk, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, dOh, Lh, Dh, Mh, start_m, cols, offs_m, offs_d, offs_dv,
                                L, S, D, DV, qk_scale, sq_m, sq_d, sd_m, sd_d, sm_m, sm_n,
                                False, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
        for start_m in range(bulk, L, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, dOh, Lh, Dh, Mh, start_m, cols, offs_m, offs_d, offs_dv,
                                L, S, D, DV, qk_scale, sq_m, sq_d, sd_m, sd_d, sm_m, sm_n,
                                True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)

    out = (b * HK + hk) * S * D + cols[:, None] * D + offs_d[None, :]
    tl.store(dK + out, (dk * scale).to(dK.dtype.element_ty), mask=(cols[:, None] < S) & (offs_d[None, :] < D))
    out = (b * HK + hk) * S * DV + cols[:, None] * DV + offs_dv[None, :]
    tl.store(dV + out, dv.to(dV.dtype.element_ty), mask=(cols[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV, qk_scale,
             sk_n, sk_d, sv_n, sv_d, sm_m, sm_n,
             MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
             EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = K + cols[:, None] * sk_n + offs_d[None, :] * sk_d
    v_ptrs = V + cols[:, None] * sv_n + offs_dv[None, :] * sv_d
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
        s = _score_mask(s, rows, cols, L, S, Mask, sm_m, sm_n, IS_CAUSAL, MASK_KIND)
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _flash_sfa_bwd_dq_kernel(
    Q, K, V, dO, Lse, Delta, Mask, dQ,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sd_b, sd_h, sd_m, sd_d, sm_b, sm_h, sm_m, sm_n,
    H, G, L, S, D, DV, qk_scale, scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    start_m, bh, b, h, rows, offs_n, offs_d, offs_dv, q, K, V, Mask = _query_block(
        Q, K, V, Mask, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sv_b, sv_h, sm_b, sm_h, H, G, L, D,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    row_ok = rows < L
    do = tl.load(dO + b * sd_b + h * sd_h + rows[:, None] * sd_m + offs_dv[None, :] * sd_d,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    bulk, hi = _key_ranges(start_m, S, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    for start_n in range(0, bulk, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV,
                      qk_scale, sk_n, sk_d, sv_n, sv_d, sm_m, sm_n, False, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
    for start_n in range(bulk, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV,
                      qk_scale, sk_n, sk_d, sv_n, sv_d, sm_m, sm_n, True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
    out = bh.to(tl.int64) * L * D + rows[:, None] * D + offs_d[None, :]
    tl.store(dQ + out, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# ------------------------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on a GPU; the first entry is the default
# when SFA_AUTOTUNE=0 (no tuning pass on first use of a shape). The interpreter runs one small tile (it
# executes every program serially on the CPU).
_FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
              (32, 32, 4, 1)]
_BWD_TILES = [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 32, 4, 4),
              (32, 32, 4, 1)]
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}
_TUNING_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "PRECISION"]


_SHARED_MEMORY_BUDGET = 200 * 1024  # of the H100's 227 KiB per block; the autotuner skips tiles that fail anyway


def _fits(configs, named_args, **kwargs):
    """Tiles whose pipelined Q/K/V blocks fit shared memory at this head dim and element size."""
    width = kwargs["BLOCK_D"] + kwargs["BLOCK_DV"]
    size = named_args["Q"].element_size()

    def smem(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return size * (m * width + max(c.num_stages, 1) * n * width)

    kept = [c for c in configs if smem(c) <= _SHARED_MEMORY_BUDGET]
    return kept or [min(configs, key=smem)]


def _tuned(kernel, tiles):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _fits})(kernel)


_fwd_tuned = _tuned(_flash_sfa_fwd_kernel, _FWD_TILES)
_dkdv_tuned = _tuned(_flash_sfa_bwd_dkdv_kernel, _BWD_TILES)
_dq_tuned = _tuned(_flash_sfa_bwd_dq_kernel, _BWD_TILES)


def _launch(tuned, raw, grid, *args, **meta):
    if interpreting():
        tile = dict(_INTERPRETER_TILE)
    elif not autotuning():
        config = _fits(tuned.configs, {"Q": args[0]}, **meta)[0]
        tile = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tuned[grid](*args, **meta)
        return
    raw[grid(tile)](*args, **meta, **tile)


def _mask_args(mask, fallback):
    """(kind, tensor, 4 strides) for an optional 4-D mask broadcast to (batch, heads, L, S)."""
    if mask is None:
        return NO_MASK, fallback, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return BOOL_MASK, mask.view(torch.uint8), mask.stride()
    return ADDITIVE_MASK, mask, mask.stride()


def _shape_meta(q, k, v, mask, is_causal):
    head_dim, value_dim = q.size(-1), v.size(-1)
    block_d, block_dv = feature_block(head_dim), feature_block(value_dim)
    return dict(
        IS_CAUSAL=is_causal, MASK_KIND=_mask_args(mask, q)[0],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=(block_d == head_dim and block_dv == value_dim),
    )


def flash_forward(q, k, v, mask, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for 4-D q (B, H, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv); H a multiple of Hk.

    ``mask``: None or 4-D, broadcast (strides may be 0) to (B, H, L, S). lse is natural-log, float32.
    """
    batch, heads, length, head_dim = q.shape
    key_heads, keys, value_dim = k.size(1), k.size(2), v.size(-1)
    out = torch.empty((batch, heads, length, value_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _, mask_t, mask_strides = _mask_args(mask, q)
    meta = _shape_meta(q, k, v, mask, is_causal)
    grid = lambda m: (cdiv(length, m["BLOCK_M"]), batch * heads)  # noqa: E731
    _launch(
        _fwd_tuned, _flash_sfa_fwd_kernel, grid,
        q, k, v, mask_t, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads, heads // key_heads, length, keys, head_dim, value_dim, scale * LOG2E, **meta,
    )
    return out, lse


def flash_backward(d_out, q, k, v, out, lse, mask, is_causal: bool, scale: float):
    """(dq, dk, dv) of ``flash_forward`` (gradients w.r.t. the sparsified q and k), contiguous."""
    batch, heads, length, head_dim = q.shape
    key_heads, keys, value_dim = k.size(1), k.size(2), v.size(-1)
    meta = _shape_meta(q, k, v, mask, is_causal)
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(cdiv(length, 32), batch * heads)](
        out, d_out, delta, length, value_dim, *out.stride(), *d_out.stride(), heads,
        BLOCK_M=32, BLOCK_DV=meta["BLOCK_DV"],
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _, mask_t, mask_strides = _mask_args(mask, q)
    strides = (*q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *mask_strides)
    _launch(
        _dkdv_tuned, _flash_sfa_bwd_dkdv_kernel, lambda m: (cdiv(keys, m["BLOCK_N"]), batch * key_heads),
        q, k, v, d_out, lse, delta, mask_t, dk, dv, *strides,
        heads, key_heads, heads // key_heads, length, keys, head_dim, value_dim, scale * LOG2E, scale, **meta,
    )
    _launch(
        _dq_tuned, _flash_sfa_bwd_dq_kernel, lambda m: (cdiv(length, m["BLOCK_M"]), batch * heads),
        q, k, v, d_out, lse, delta, mask_t, dq, *strides,
        heads, heads // key_heads, length, keys, head_dim, value_dim, scale * LOG2E, scale, **meta,
    )
    return dq, dk, dv
