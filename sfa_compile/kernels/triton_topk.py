"""Triton top-k sparsification of query/key features: one pass, the Triton twin of ``topk.sparsify_dense``.

Per row (token and head) of d features, keep the ``topk`` largest |x| (ties: lower index wins) and zero the
rest. No full sort. Two searches; ``default_search`` picks one by dtype and topk (measured on the
H100: benchmarks/bench_topk.py, LOG.md):
- bit search (``topk_keep``, any dtype, cost independent of topk): the k-th largest magnitude by a bitwise binary
  search on the float bits of |x| (non-negative floats order like their bit patterns as integers), one
  compare-and-count over the row per bit: 31 steps for float32, 15 for bfloat16 and 18 for float16, whose low bits
  are zero after the exact upcast. The compares run as float compares against the candidate's float value (the
  FP32 pipe has twice the INT32 throughput on Hopper; the search is compute-bound). Equal magnitudes at the
  threshold are then kept in index order with a running count. NaN ranks above every number as in torch's sort
  (the search treats it as inf, so only rows holding more than ``topk`` NaN and inf values may pick a different
  one of them).
- rank search (``topk_keep_by_rank``, float16 / bfloat16 with topk <= RANK_SEARCH_MAX_TOPK): ``topk`` rounds over
  unique per-feature keys, exact with ties and NaN as the sort orders them.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .launcher import cdiv, interpreted, next_power_of_2

# Lowest bit of the float32 pattern that can be non-zero after upcasting from each dtype.
LOW_BIT = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}


def feature_block(head_dim: int) -> int:
    """Feature columns per tile: the head dim rounded up to a power of two, at least tl.dot's 16."""
    return max(next_power_of_2(head_dim), 16)


def interpreting() -> bool:
    """Kernels run on the CPU through Triton's interpreter (one small tile, no tuning): as Triton decided when it
    decorated them (``interpreted``, which ``Launcher`` uses too), not the environment read per call."""
    return interpreted(_topk_sparsify_kernel)


@functools.cache
def autotuning() -> bool:
    """False with SFA_AUTOTUNE=0: default tiles, no tuning pass on the first call of a shape. Read once, at the
    first launch (set it before running kernels)."""
    return os.environ.get("SFA_AUTOTUNE", "1") != "0"


# Largest topk that the rank search takes: at 16 it loses to the bit search (benchmarks/LOG.md).
RANK_SEARCH_MAX_TOPK = 8
# Bit pattern of +inf of the 16-bit dtypes the rank search takes (NaN patterns lie above it).
INF_PATTERN = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def _configs():
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r in (16, 32, 64) for w in (1, 2, 4, 8)]


@triton.jit
def topk_keep(x, ok, topk, LOW_BIT: tl.constexpr):
    """Keep mask of the ``topk`` largest |x| per row of the 2-D tile ``x`` (False where not ``ok``)."""
    magnitude = tl.where(ok, tl.abs(x.to(tl.float32)), -1.0)  # padding never counts
    searched = tl.where(magnitude != magnitude, float("inf"), magnitude)  # NaN compares as inf
    threshold = tl.zeros([x.shape[0]], dtype=tl.int32)
    for bit in tl.static_range(30, LOW_BIT - 1, -1):  # largest t with count(|x| >= t) >= topk
        candidate = threshold | (1 << bit)
        above_candidate = searched >= candidate.to(tl.float32, bitcast=True)[:, None]
        count = tl.sum(tl.where(above_candidate, 1.0, 0.0), axis=1)
        threshold = tl.where(count >= topk, candidate, threshold)
    bits = magnitude.to(tl.int32, bitcast=True)  # exact order, NaN above inf; padding (-1.0) negative
    above = bits > threshold[:, None]
    at = bits == threshold[:, None]
    room = topk - tl.sum(above.to(tl.int32), axis=1)
    return above | (at & (tl.cumsum(at.to(tl.int32), axis=1) <= room[:, None]))


@triton.jit
def rank_keys(x, ok, cols, INF_BITS: tl.constexpr):
    """Each feature's key of a 16-bit tile ``x``: |x| bits * 256 + (255 - column), unique and exact in float32
    (< 2^23; NaN payloads all rank just above inf, then by column); -1 where not ``ok``."""
    bits = tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, INF_BITS + 1)
    return tl.where(ok, (bits * 256 + (255 - cols[None, :])).to(tl.float32), -1.0)


@triton.jit
def topk_keep_by_rank(x, ok, cols, topk, INF_BITS: tl.constexpr):
    """``topk_keep`` for a 16-bit tile ``x``: ``topk`` rounds of "largest ``rank_keys`` key below the last one" find
    the k-th key, ties broken by column as the sort breaks them."""
    key = rank_keys(x, ok, cols, INF_BITS)
    kth = tl.full([x.shape[0]], float("inf"), tl.float32)
    for _ in range(topk):
        kth = tl.max(tl.where(key < kth[:, None], key, -1.0), axis=1)
    return key >= kth[:, None]


@triton.jit
def _topk_sparsify_kernel(
    X, Y,
    n_rows, n_heads, length, head_dim, topk,
    stride_b, stride_h, stride_n, stride_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, INF_BITS: tl.constexpr,
    SEARCH: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    n = rows % length
    h = (rows // length) % n_heads
    b = rows // (length * n_heads)
    ok = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
    x = tl.load(X + (b * stride_b + h * stride_h + n * stride_n)[:, None] + cols[None, :] * stride_d,
                mask=ok, other=0.0)
    if SEARCH == 1:
        keep = topk_keep_by_rank(x, ok, cols, topk, INF_BITS)
    else:
        keep = topk_keep(x, ok, topk, LOW_BIT)
    out = rows[:, None] * head_dim + cols[None, :]
    tl.store(Y + out, tl.where(keep, x, 0.0), mask=ok)


SEARCHES = ("bit", "rank")


def default_search(dtype: torch.dtype, topk: int) -> str:
    """The search the rule picks (module docstring)."""
    return "rank" if topk <= RANK_SEARCH_MAX_TOPK and dtype in INF_PATTERN else "bit"


def sparsify_triton(x: torch.Tensor, topk: int, search: Optional[str] = None) -> torch.Tensor:
    """Contiguous copy of the 4-D ``x`` with all but the top-k features of each row zeroed.

    ``x`` is (batch, heads, length, features) with any strides, in float16, bfloat16 or float32. ``search`` (one of
    ``SEARCHES``; default ``default_search``) picks the selection; both give the same result.
    """
    search = search or default_search(x.dtype, topk)
    if search not in SEARCHES or (search != "bit" and x.dtype not in INF_PATTERN):
        raise ValueError(f"sparsify_triton: search must be one of {SEARCHES} ('rank' takes float16 and bfloat16), "
                         f"got {search!r} for {x.dtype}")
    batch, heads, length, head_dim = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = batch * heads * length
    if n_rows == 0:
        return y
    args = (x, y, n_rows, heads, length, head_dim, topk, *x.stride())
    meta = dict(BLOCK_D=feature_block(head_dim), LOW_BIT=LOW_BIT[x.dtype], INF_BITS=INF_PATTERN.get(x.dtype, 0),
                SEARCH=SEARCHES.index(search))
    if interpreting() or not autotuning():
        _topk_sparsify_kernel[(cdiv(n_rows, 32),)](*args, **meta, BLOCK_R=32, num_warps=4)
    else:
        _topk_tuned[lambda m: (cdiv(n_rows, m["BLOCK_R"]),)](*args, **meta)
    return y


_topk_tuned = triton.autotune(_configs(), key=["BLOCK_D", "LOW_BIT", "SEARCH"])(_topk_sparsify_kernel)


@triton.jit
def _zero_dropped_kernel(G, X, n_rows, head_dim, topk, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """G *= keep, keep = ``topk.kept_features(X, topk)``: rows of contiguous (n_rows, head_dim) tensors."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
    offsets = rows[:, None] * head_dim + cols[None, :]
    x = tl.load(X + offsets, mask=ok, other=0.0)
    nonzero = (x != 0.0) & ok  # NaN included
    zero = (x == 0.0) & ok
    missing = topk - tl.sum(nonzero.to(tl.int32), axis=1)
    keep = nonzero | (zero & (tl.cumsum(zero.to(tl.int32), axis=1) <= missing[:, None]))
    g = tl.load(G + offsets, mask=ok, other=0.0)
    tl.store(G + offsets, tl.where(keep, g, 0.0), mask=ok)


def zero_dropped_triton(grad: torch.Tensor, x_sparse: torch.Tensor, topk: int) -> torch.Tensor:
    """``grad`` with the features ``x_sparse``'s top-k dropped set to zero (in place on a contiguous ``grad`` of
    x_sparse's shape; x_sparse is contiguous, as ``sparsify_triton`` writes it): one pass, no second top-k."""
    grad = grad.contiguous()
    head_dim = x_sparse.size(-1)
    n_rows = x_sparse.numel() // max(head_dim, 1)
    if n_rows:
        block_r = 32 if interpreting() else 16
        _zero_dropped_kernel[(cdiv(n_rows, block_r),)](grad, x_sparse, n_rows, head_dim, topk, BLOCK_R=block_r,
                                                       BLOCK_D=feature_block(head_dim), num_warps=4)
    return grad
