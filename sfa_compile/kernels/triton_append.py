"""Triton kernels that write the compressed key cache: the append kernel, and the decode prologue (query rows
projected by R and sparsified once per key head; a decode step's new tokens appended).

Append: one program per (sequence, key head, block of 16 new tokens) projects the key rows by R when given (above
``MAX_FUSED_PROJECTION_DIM``, R runs as a torch matmul before the kernel), computes their top-k, writes the kept
values and their ascending indices at the sequence's current length, and copies V. Lengths are not advanced here:
the cache (or the decode step's merge kernel) owns that.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launcher import Launcher, cdiv
from .limits import MAX_FUSED_PROJECTION_DIM
from .topk import project_by_key_head
from .triton_topk import LOW_BIT, feature_block, topk_keep


@triton.jit
def _load_rows(X, row_offsets, stride_x_d, row_ok, r_base, stride_r_in, stride_r_out, head_dim, BLOCK_D: tl.constexpr,
               HAS_R: tl.constexpr,
               PRECISION: tl.constexpr):
    """Rows X[row_offsets] (d features ``stride_x_d`` apart; zeros where not ``row_ok``), with HAS_R times R of one key
    head (>= 16 rows: tl.dot), accumulated in float32 and rounded to X's dtype, as x @ R.to(x.dtype)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    x = tl.load(X + row_offsets[:, None] + cols[None, :] * stride_x_d, mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    if HAS_R:
        r = tl.load(r_base + cols[:, None] * stride_r_in + cols[None, :] * stride_r_out,
                    mask=col_ok[:, None] & col_ok[None, :],
                    other=0.0)
        x = tl.dot(x, r.to(X.dtype.element_ty), input_precision=PRECISION).to(X.dtype.element_ty)
    return x


@triton.jit
def _sparse_query_rows(Q, R, OUT, b, hk, topk, head_dim, q_len, group, key_heads,
                       stride_q_b, stride_q_h, stride_q_t, stride_q_d, stride_r_h, stride_r_in, stride_r_out,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, PRECISION: tl.constexpr):
    """The query rows of one (sequence, key head), projected by R, all but their top-k features zeroed,
    written contiguous (B, Hq, T, d) for the split kernel (PRESPARSE), so no split program repeats the top-k."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < group * q_len
    heads = hk * group + rows // q_len
    t = rows % q_len
    cols = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (cols < head_dim)[None, :]
    q = _load_rows(Q, b * stride_q_b + heads * stride_q_h + t * stride_q_t, stride_q_d, row_ok, R + hk * stride_r_h,
                   stride_r_in, stride_r_out, head_dim, BLOCK_D, True,
                   PRECISION)
    q = tl.where(topk_keep(q, ok, topk, LOW_BIT), q, 0.0)
    out_rows = (b * key_heads * group + heads) * q_len + t
    tl.store(OUT + out_rows[:, None] * head_dim + cols[None, :], q, mask=ok)


@triton.jit
def append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, b, h, n, row_ok, start, head_dim, topk, capacity,
                 stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n, stride_v_d,
                 stride_r_h, stride_r_in, stride_r_out, stride_kval_b, stride_kval_h, stride_kval_n, stride_kidx_b,
                 stride_kidx_h, stride_kidx_n, stride_vcache_b, stride_vcache_h, stride_vcache_n,
                 BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, HAS_R: tl.constexpr, PRECISION: tl.constexpr):
    """New tokens ``n`` (>= 16 rows, ``row_ok`` real) of one (sequence, key head): keys projected by R when given,
    their top-k values and ascending indices written at slots start + n, V copied; slots past ``capacity`` are
    dropped. Returns (the sparsified keys, zero past the capacity; the values in the cache's dtype)."""
    cols = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (cols < head_dim)[None, :]
    x = _load_rows(KEYS, b * stride_k_b + h * stride_k_h + n * stride_k_n, stride_k_d, row_ok, R + h * stride_r_h,
                   stride_r_in, stride_r_out, head_dim, BLOCK_D, HAS_R,
                   PRECISION)
    keep = topk_keep(x, ok, topk, LOW_BIT)
    slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # ascending feature order
    pos = start + n
    row_ok = row_ok & (pos < capacity)  # a full fixed cache under torch.compile: drop, never write past it
    ok = ok & row_ok[:, None]
    keep = keep & row_ok[:, None]
    tl.store(KVAL + b * stride_kval_b + h * stride_kval_h + (pos * stride_kval_n)[:, None] + slot,
             x.to(KVAL.dtype.element_ty), mask=keep)
    tl.store(KIDX + b * stride_kidx_b + h * stride_kidx_h + (pos * stride_kidx_n)[:, None] + slot,
             cols[None, :].to(KIDX.dtype.element_ty)
             + tl.zeros_like(slot).to(KIDX.dtype.element_ty), mask=keep)
    v = tl.load(VALUES + b * stride_v_b + h * stride_v_h + n[:, None] * stride_v_n + cols[None, :] * stride_v_d,
                mask=ok, other=0.0)
    v = v.to(VCACHE.dtype.element_ty)
    tl.store(VCACHE + b * stride_vcache_b + h * stride_vcache_h + (pos * stride_vcache_n)[:, None] + cols[None, :], v,
             mask=ok)
    return tl.where(keep, x, 0.0), v


@triton.jit
def decode_prologue_kernel(
    Q, R, QOUT, KEYS, VALUES, KVAL, KIDX, VCACHE, LENGTHS,
    topk, head_dim, q_len, group, key_heads, new_tokens, capacity,
    stride_q_b, stride_q_h, stride_q_t, stride_q_d,
    stride_r_h, stride_r_in, stride_r_out,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_kval_b, stride_kval_h, stride_kval_n,
    stride_kidx_b, stride_kidx_h, stride_kidx_n,
    stride_vcache_b, stride_vcache_h, stride_vcache_n,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (sequence, key head): program column 0 sparsifies the query rows; column 1 (a decode step's grid
    only) appends the step's <= 16 new tokens at the sequence's length, which it does not advance."""
    bh = tl.program_id(0)
    b = (bh // key_heads).to(tl.int64)
    hk = bh % key_heads
    if tl.program_id(1) == 0:
        _sparse_query_rows(Q, R, QOUT, b, hk, topk, head_dim, q_len, group, key_heads, stride_q_b, stride_q_h,
                           stride_q_t, stride_q_d, stride_r_h, stride_r_in,
                           stride_r_out, BLOCK_M, BLOCK_D, LOW_BIT, PRECISION)
    else:
        n = tl.arange(0, 16)
        append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, b, hk, n, n < new_tokens, tl.load(LENGTHS + b), head_dim,
                     topk, capacity, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h,
                     stride_v_n, stride_v_d, stride_r_h, stride_r_in, stride_r_out, stride_kval_b, stride_kval_h,
                     stride_kval_n, stride_kidx_b, stride_kidx_h,
                     stride_kidx_n, stride_vcache_b, stride_vcache_h, stride_vcache_n, BLOCK_D, LOW_BIT, True,
                     PRECISION)


@triton.jit
def _append_kernel(
    KEYS, VALUES, R, KVAL, KIDX, VCACHE, STARTS, COUNTS,
    key_heads, length, head_dim, topk, capacity,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_r_h, stride_r_in, stride_r_out,
    stride_kval_b, stride_kval_h, stride_kval_n,
    stride_kidx_b, stride_kidx_h, stride_kidx_n,
    stride_vcache_b, stride_vcache_h, stride_vcache_n,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, RAGGED: tl.constexpr,
    HAS_R: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # new tokens of one (sequence, key head)
    bh = tl.program_id(1)
    b = (bh // key_heads).to(tl.int64)
    h = bh % key_heads
    row_ok = n < length
    if RAGGED:
        row_ok = row_ok & (n < tl.load(COUNTS + b))
    append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, b, h, n, row_ok, tl.load(STARTS + b), head_dim, topk, capacity,
                 stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n, stride_v_d,
                 stride_r_h, stride_r_in, stride_r_out, stride_kval_b, stride_kval_h, stride_kval_n, stride_kidx_b,
                 stride_kidx_h, stride_kidx_n, stride_vcache_b, stride_vcache_h, stride_vcache_n,
                 BLOCK_D, LOW_BIT, HAS_R, PRECISION)


def append_compressed(key_values: torch.Tensor, key_indices: torch.Tensor, value_cache: torch.Tensor,
                      lengths: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      counts: Optional[torch.Tensor], projection: Optional[torch.Tensor] = None) -> None:
    """Write compressed keys (projected by ``projection[key head]`` first when given) and dense values at each
    sequence's device length: all T tokens of every sequence, or the first ``counts[b]``; rows past the capacity
    are dropped. ``lengths`` is not advanced."""
    batch, heads, length, head_dim = keys.shape
    if batch * heads * length == 0:
        return
    if projection is not None and head_dim > MAX_FUSED_PROJECTION_DIM:
        keys, projection = project_by_key_head(keys, projection), None
    block_r = 16  # tl.dot's smallest row count (the projection)
    _APPEND((cdiv(length, block_r), batch * heads), (
        keys, values, keys if projection is None else projection, key_values, key_indices, value_cache, lengths,
        lengths if counts is None else counts,
        heads, length, head_dim, key_values.size(-1), value_cache.size(2), *keys.stride(), *values.stride(),
        *(projection.stride() if projection is not None else (0, 0, 0)),
        *key_values.stride()[:3], *key_indices.stride()[:3], *value_cache.stride()[:3],
    ), _APPEND.config(dict(BLOCK_R=block_r, BLOCK_D=feature_block(head_dim), LOW_BIT=LOW_BIT[keys.dtype],
                           RAGGED=counts is not None, HAS_R=projection is not None,
                           PRECISION="ieee" if keys.dtype == torch.float32 else "tf32"), 4, 3))


# A prompt's keys and values are views whose strides follow its length: keyed by rule, like the length.
_APPEND = Launcher(_append_kernel, pointers=8, varying=("length", "capacity", "stride_k_b", "stride_k_h",
                                                        "stride_k_n", "stride_v_b", "stride_v_h", "stride_v_n"))
