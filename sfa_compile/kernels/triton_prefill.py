"""Triton flash attention over top-k-sparsified queries and keys: the FlashSFA prefill forward (the backward is
``triton_prefill_backward``).

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
from .limits import LN2, LOG2E
from .prefill_launch import ADDITIVE_MASK, BOOL_MASK, FWD_TILES, NO_MASK, launch, mask_args, shape_meta, tuned

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = tl.constexpr(NO_MASK), tl.constexpr(BOOL_MASK), tl.constexpr(ADDITIVE_MASK)


@triton.jit
def _score_mask(qk, rows, cols, L, S, Mask, stride_mask_m, stride_mask_n, IS_CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr):
    """Apply bounds, causal and the user mask to a [rows, cols] tile of base-2 scores."""
    valid = (cols[None, :] < S) & (rows[:, None] < L)
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if MASK_KIND == _BOOL_MASK:
        keep = tl.load(Mask + rows[:, None] * stride_mask_m + cols[None, :] * stride_mask_n, mask=valid, other=0)
        valid = valid & (keep != 0)
    if MASK_KIND == _ADDITIVE_MASK:
        add = tl.load(Mask + rows[:, None] * stride_mask_m + cols[None, :] * stride_mask_n, mask=valid, other=0.0)
        qk = qk + add.to(tl.float32) * _LOG2E
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
    if MASK_KIND == _NO_MASK:
        bulk = S // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            bulk = tl.minimum(bulk, (start_m + 1) // BLOCK_N * BLOCK_N)
    return bulk, hi


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv, L, S, D, DV, qk_scale,
              stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_m, stride_mask_n,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = K + offs_d[:, None] * stride_k_d + cols[None, :] * stride_k_n
    v_ptrs = V + cols[:, None] * stride_v_n + offs_dv[None, :] * stride_v_d
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
        qk = _score_mask(qk, rows, cols, L, S, Mask, stride_mask_m, stride_mask_n, IS_CAUSAL, MASK_KIND)
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
def _query_block(Q, K, V, Mask, stride_q_b, stride_q_h, stride_q_m, stride_q_d, stride_k_b, stride_k_h, stride_v_b,
                 stride_v_h, stride_mask_b, stride_mask_h, H, G, L, D,
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
    q = tl.load(Q + b * stride_q_b + h * stride_q_h + rows[:, None] * stride_q_m + offs_d[None, :] * stride_q_d,
                mask=(rows[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    return (start_m, bh, b, h, rows, tl.arange(0, BLOCK_N), offs_d, tl.arange(0, BLOCK_DV), q,
            K + b * stride_k_b + hk * stride_k_h, V + b * stride_v_b + hk * stride_v_h,
            Mask + b * stride_mask_b + h * stride_mask_h)


@triton.jit
def _flash_sfa_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b,
    stride_v_h, stride_v_n, stride_v_d,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, stride_out_b, stride_out_h, stride_out_m, stride_out_d,
    H, G, L, S, D, DV, qk_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    start_m, bh, b, h, rows, offs_n, offs_d, offs_dv, q, K, V, Mask = _query_block(
        Q, K, V, Mask, stride_q_b, stride_q_h, stride_q_m, stride_q_d, stride_k_b, stride_k_h, stride_v_b, stride_v_h,
        stride_mask_b, stride_mask_h, H, G, L, D,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    bulk, hi = _key_ranges(start_m, S, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    for start_n in range(0, bulk, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv,
                                  L, S, D, DV, qk_scale, stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_m,
                                  stride_mask_n,
                                  False, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)
    for start_n in range(bulk, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, Mask, start_n, rows, offs_n, offs_d, offs_dv,
                                  L, S, D, DV, qk_scale, stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_m,
                                  stride_mask_n,
                                  True, IS_CAUSAL, MASK_KIND, EVEN_D, PRECISION)

    empty = l_i == 0.0  # every key masked: output 0, lse +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    out_rows = b * stride_out_b + h * stride_out_h + rows[:, None] * stride_out_m
    tl.store(Out + out_rows + offs_dv[None, :] * stride_out_d, out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < L) & (offs_dv[None, :] < DV))
    tl.store(Lse + bh.to(tl.int64) * L + rows, lse, mask=rows < L)


_fwd_tuned = tuned(_flash_sfa_fwd_kernel, FWD_TILES)


def flash_forward(q, k, v, mask, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for 4-D q (B, H, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv); H a multiple of Hk.

    ``mask``: None or 4-D, broadcast (strides may be 0) to (B, H, L, S). lse is natural-log, float32.
    """
    batch, heads, length, head_dim = q.shape
    key_heads, keys, value_dim = k.size(1), k.size(2), v.size(-1)
    out = torch.empty((batch, heads, length, value_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _, mask_t, mask_strides = mask_args(mask, q)
    meta = shape_meta(q, k, v, mask, is_causal)
    grid = lambda m: (cdiv(length, m["BLOCK_M"]), batch * heads)  # noqa: E731
    launch(
        _fwd_tuned, _flash_sfa_fwd_kernel, grid,
        q, k, v, mask_t, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads, heads // key_heads, length, keys, head_dim, value_dim, scale * LOG2E, **meta,
    )
    return out, lse
