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
from .limits import FP8_VALUE_DTYPE, FP8_VALUE_MAX, MAX_FUSED_PROJECTION_DIM
from .topk import project_by_key_head
from .triton_topk import LOW_BIT, feature_block, topk_keep

FP8_MAX = tl.constexpr(FP8_VALUE_MAX)


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
def _round_to_e4m3(y):
    """float32 ``y`` (|y| <= FP8_MAX) rounded to the nearest e4m3fn value (ties to even), still float32, so that the
    conversion to FP8 after it is exact: Triton's interpreter rounds that conversion without carrying into the
    exponent (127.25 becomes 64). Integer steps only, which no floating-point contraction can change: the normal
    range rounds the mantissa to 3 bits on the bit pattern; below 2^-6 the subnormals' fixed step 2^-9 rounds
    |y| * 2^9 (exact, < 8) to an integer, then the sign bit is put back."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    steps = tl.abs(y) * 512.0
    whole = steps.to(tl.int32)  # truncation
    rest = steps - whole.to(tl.float32)
    up = (rest > 0.5) | ((rest == 0.5) & ((whole & 1) == 1))
    subnormal = (whole + up.to(tl.int32)).to(tl.float32) * 0.001953125
    # y's sign bit put on |result|: a negation may compile to 0 - x, which loses -0.0 (what torch gives).
    signed = (subnormal.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) >= 0.015625, normal, signed)


@triton.jit
def append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, VSCALE, b, h, n, row_ok, start, head_dim, topk, capacity,
                 stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n, stride_v_d,
                 stride_r_h, stride_r_in, stride_r_out, stride_kval_b, stride_kval_h, stride_kval_n, stride_kidx_b,
                 stride_kidx_h, stride_kidx_n, stride_vcache_b, stride_vcache_h, stride_vcache_n, stride_vscale_b,
                 stride_vscale_h, stride_vscale_n,
                 BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, HAS_R: tl.constexpr, PRECISION: tl.constexpr,
                 FP8_V: tl.constexpr):
    """New tokens ``n`` (>= 16 rows, ``row_ok`` real) of one (sequence, key head): keys projected by R when given,
    their top-k values and ascending indices written at slots start + n, V copied (FP8_V: quantized, each row
    divided by its scale, its largest magnitude / FP8_MAX, which goes to VSCALE); slots past ``capacity`` are
    dropped. Returns (the sparsified keys, zero past the capacity; the values as cached; their scales, ones
    without FP8_V)."""
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
    if FP8_V:  # exact IEEE divisions, as the reference (cache_reference.quantize_values)
        v = v.to(tl.float32)
        v_scale = tl.math.div_rn(tl.max(tl.abs(v), axis=1), FP8_MAX)
        v = _round_to_e4m3(tl.math.div_rn(v, tl.where(v_scale > 0, v_scale, 1.0)[:, None]))
        tl.store(VSCALE + b * stride_vscale_b + h * stride_vscale_h + pos * stride_vscale_n, v_scale, mask=row_ok)
    else:
        v_scale = tl.where(row_ok, 1.0, 1.0)
    v = v.to(VCACHE.dtype.element_ty)
    tl.store(VCACHE + b * stride_vcache_b + h * stride_vcache_h + (pos * stride_vcache_n)[:, None] + cols[None, :], v,
             mask=ok)
    return tl.where(keep, x, 0.0), v, v_scale


@triton.jit
def decode_prologue_kernel(
    Q, R, QOUT, KEYS, VALUES, KVAL, KIDX, VCACHE, VSCALE, LENGTHS,
    topk, head_dim, q_len, group, key_heads, new_tokens, capacity,
    stride_q_b, stride_q_h, stride_q_t, stride_q_d,
    stride_r_h, stride_r_in, stride_r_out,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_kval_b, stride_kval_h, stride_kval_n,
    stride_kidx_b, stride_kidx_h, stride_kidx_n,
    stride_vcache_b, stride_vcache_h, stride_vcache_n,
    stride_vscale_b, stride_vscale_h, stride_vscale_n,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, PRECISION: tl.constexpr,
    FP8_V: tl.constexpr,
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
        append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, VSCALE, b, hk, n, n < new_tokens, tl.load(LENGTHS + b),
                    head_dim, topk, capacity, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h,
                    stride_v_n, stride_v_d, stride_r_h, stride_r_in, stride_r_out, stride_kval_b, stride_kval_h,
                    stride_kval_n, stride_kidx_b, stride_kidx_h, stride_kidx_n, stride_vcache_b, stride_vcache_h,
                    stride_vcache_n, stride_vscale_b, stride_vscale_h, stride_vscale_n, BLOCK_D, LOW_BIT, True,
                    PRECISION, FP8_V)


@triton.jit
def _append_kernel(
    KEYS, VALUES, R, KVAL, KIDX, VCACHE, VSCALE, STARTS, COUNTS,
    key_heads, length, head_dim, topk, capacity,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_r_h, stride_r_in, stride_r_out,
    stride_kval_b, stride_kval_h, stride_kval_n,
    stride_kidx_b, stride_kidx_h, stride_kidx_n,
    stride_vcache_b, stride_vcache_h, stride_vcache_n,
    stride_vscale_b, stride_vscale_h, stride_vscale_n,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, RAGGED: tl.constexpr,
    HAS_R: tl.constexpr, PRECISION: tl.constexpr, FP8_V: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # new tokens of one (sequence, key head)
    bh = tl.program_id(1)
    b = (bh // key_heads).to(tl.int64)
    h = bh % key_heads
    row_ok = n < length
    if RAGGED:
        row_ok = row_ok & (n < tl.load(COUNTS + b))
    append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, VSCALE, b, h, n, row_ok, tl.load(STARTS + b), head_dim, topk,
                capacity, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n,
                stride_v_d, stride_r_h, stride_r_in, stride_r_out, stride_kval_b, stride_kval_h, stride_kval_n,
                stride_kidx_b, stride_kidx_h, stride_kidx_n, stride_vcache_b, stride_vcache_h, stride_vcache_n,
                stride_vscale_b, stride_vscale_h, stride_vscale_n, BLOCK_D, LOW_BIT, HAS_R, PRECISION, FP8_V)


def append_compressed(key_values: torch.Tensor, key_indices: torch.Tensor, value_cache: torch.Tensor,
                      lengths: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      counts: Optional[torch.Tensor], projection: Optional[torch.Tensor] = None,
                      value_scales: Optional[torch.Tensor] = None) -> None:
    """Write compressed keys (projected by ``projection[key head]`` first when given) and dense values (FP8 with
    their ``value_scales`` when the value cache is FP8) at each sequence's device length: all T tokens of every
    sequence, or the first ``counts[b]``; rows past the capacity are dropped. ``lengths`` is not advanced."""
    batch, heads, length, head_dim = keys.shape
    if batch * heads * length == 0:
        return
    if projection is not None and head_dim > MAX_FUSED_PROJECTION_DIM:
        keys, projection = project_by_key_head(keys, projection), None
    block_r = 16  # tl.dot's smallest row count (the projection)
    scales_arg, scale_strides = scale_args(value_scales, lengths)
    _APPEND((cdiv(length, block_r), batch * heads), (
        keys, values, keys if projection is None else projection, key_values, key_indices, value_cache,
        scales_arg, lengths, lengths if counts is None else counts,
        heads, length, head_dim, key_values.size(-1), value_cache.size(2), *keys.stride(), *values.stride(),
        *(projection.stride() if projection is not None else (0, 0, 0)),
        *key_values.stride()[:3], *key_indices.stride()[:3], *value_cache.stride()[:3],
        *scale_strides,
    ), _APPEND.config(dict(BLOCK_R=block_r, BLOCK_D=feature_block(head_dim), LOW_BIT=LOW_BIT[keys.dtype],
                           RAGGED=counts is not None, HAS_R=projection is not None,
                           PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
                           FP8_V=value_cache.dtype == FP8_VALUE_DTYPE), 4, 3))


def scale_args(value_scales: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple:
    """(pointer, (sequence, key head, slot) strides) of FP8 values' scales for a kernel; without them, a placeholder
    pointer and zero strides (the kernels never read them)."""
    return (placeholder, (0, 0, 0)) if value_scales is None else (value_scales, value_scales.stride())


# A prompt's keys and values are views whose strides follow its length: keyed by rule, like the length.
_APPEND = Launcher(_append_kernel, pointers=9, varying=("length", "capacity", "stride_k_b", "stride_k_h",
                                                        "stride_k_n", "stride_v_b", "stride_v_h", "stride_v_n"))
