"""Triton FlashSFA decode over a compressed key cache (split-KV), and the cache's append kernel.

Decode (query length 1..16): one program per (sequence, key head, split of the cached tokens). It first asks L2 for
its split's first key block (a prefetch nothing waits on), loads the query rows of the key head's whole GQA group
(group x query length rows), takes their top-k in registers (``topk_keep``; with a projection R, a first small
"prologue" kernel projects and sparsifies the query rows once per key head instead: R in every split program costs
its 32 KB shared-memory tile, and occupancy), then streams its split of the cache once: per block of keys it loads
the compressed keys (values + indices) and dense V, forms the scores by gathering the kept key features' query
entries from the register tile (``tl.gather``: the scattered global loads that made a gather-per-key design 4x
slower than dense never happen), and accumulates P @ V on tensor cores with an online softmax (P repeated to the 16
rows tl.dot needs when the group has fewer; only the real rows are gathered and stored). A second kernel merges the
splits' partial results. On Hopper both launch as programmatic dependents of the kernel before them (PDL): each is
scheduled while that one finishes and waits for it in-kernel, which hides part of the launch gap. Rows are aligned
to the end of each sequence (query t of T sees keys up to length - T + t), sequences have their own lengths, and an
optional boolean mask (True = attend) broadcasts like SDPA's.

Decode step (``decode`` given the step's new keys and values): without R, one more program per (sequence, key
head) of the split kernel appends them at the sequence's length and attends to them from registers, while the
others stream the tokens cached before; with R, the prologue kernel appends them (its second program column)
and the split kernel counts them in each sequence's length. The merge kernel advances the device lengths. A
whole step of one layer is two launches without R, three with.

Append: one program per (sequence, key head, block of 16 new tokens) projects the key rows by R when given
(above head dim 128, R runs as a torch matmul before either kernel), computes their top-k, writes the kept
values and their ascending indices at the sequence's current length, and copies V.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .launcher import LaunchConfig, Launcher, cdiv, next_power_of_2
from .topk import project_by_key_head
from .triton_topk import LOW_BIT, feature_block, topk_keep

_MIN_SPLIT_TOKENS = 128
_LONG_SPLIT_TOKENS = 4096  # four-per-multiprocessor splits this long are split four times further
_MERGE_COLUMNS = 32  # feature columns per merge program: more programs with fewer bytes each
# The fused projection loads R as one (d, d) tile per program, tested on the GPU up to d = 128; beyond that the
# tile would spill registers, so R runs as a torch matmul first.
_MAX_FUSED_PROJECTION_DIM = 128


def _min_rows(block_d: int, topk: int, num_warps: int) -> int:
    """Score rows per program at least: the fewest Triton 3.6 compiles (its thread locality pass fails on 4 rows at
    head dim 16 and on 2 rows with 4 warps); 2 rows with 2 warps let a GQA-2 step rank no padding rows."""
    if block_d <= 16:
        return 8
    return 2 if num_warps == 2 and block_d <= 128 and topk <= 16 else 4


def _score_rows(rows: int, head_dim: int, topk: int, num_warps: int = 4) -> int:
    """M_REAL: the split kernel's score rows for ``rows`` = group x query length real ones."""
    return max(next_power_of_2(rows), _min_rows(feature_block(head_dim), topk, num_warps))


@triton.jit
def _prefetch_l2(pointers):
    """Ask L2 for the lines at ``pointers`` (PTX prefetch): nothing waits for them and no register receives them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [pointers], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _user_mask(MASK, b, heads, t, row_ok, offs_n, n_keys, smb, smh, smt, sms, HAS_MASK: tl.constexpr,
               MASK_ROW: tl.constexpr):
    """The boolean mask (True: attend; all True without one) of the score rows at keys ``offs_n``. Bounded by the
    slot count, not the split: constant over 16 keys, so it loads as vectors; one row for all query rows when it
    does not vary over them (a generation step's)."""
    if HAS_MASK:
        if MASK_ROW:
            user = tl.load(MASK + b * smb + offs_n * sms, mask=offs_n < n_keys, other=0)
            allowed = tl.broadcast_to((user != 0)[None, :], (heads.shape[0], offs_n.shape[0]))
        else:
            user = tl.load(MASK + b * smb + heads[:, None] * smh + t[:, None] * smt + offs_n[None, :] * sms,
                           mask=row_ok[:, None] & (offs_n < n_keys)[None, :], other=0)
            allowed = user != 0
    else:
        allowed = tl.full((heads.shape[0], offs_n.shape[0]), True, tl.int1)
    return allowed


@triton.jit
def _softmax_block(s, allowed, v, m_i, l_i, acc, REP: tl.constexpr, PRECISION: tl.constexpr):
    """One block of keys into the online softmax: scores ``s`` (M_REAL rows, log2 units) where ``allowed``,
    values ``v``; P is repeated REP times to the >= 16 rows of the tensor-core P @ V."""
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_rep = tl.reshape(tl.broadcast_to(p[None, :, :], (REP, s.shape[0], s.shape[1])), (REP * s.shape[0], s.shape[1]))
    alpha_rep = tl.reshape(tl.broadcast_to(alpha[None, :], (REP, s.shape[0])), (REP * s.shape[0],))
    acc = acc * alpha_rep[:, None] + tl.dot(p_rep.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_new_tokens(q, NEW_K, NEW_V, KVAL, KIDX, V, MASK, b, hk, heads, t, row_ok, last, cached, pending, n_keys,
                       m_i, l_i, acc, scale_log2, head_dim, topk, snkb, snkh, snkn, snkd, snvb, snvh, snvn, snvd,
                       skb, skh, sks, sib, sih, sis, svb, svh, svs, smb, smh, smt, sms, REP: tl.constexpr,
                       BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROW: tl.constexpr,
                       PRECISION: tl.constexpr):
    """A decode step's <= 16 new tokens (no projection): appended at the sequence's cached length (as
    _append_rows) and folded into the online softmax from registers. q holds values of the keys' dtype, so the
    tensor-core scores are exact products either way; the REP copies of each score row are equal."""
    new = tl.arange(0, 16)
    keys, values = _append_rows(NEW_K, NEW_V, NEW_K, KVAL, KIDX, V, b, hk, new, new < pending, cached, head_dim, topk,
                                n_keys, snkb, snkh, snkn, snkd, snvb, snvh, snvn, snvd, 0, 0, 0, skb, skh, sks, sib,
                                sih, sis, svb, svh, svs, BLOCK_D, LOW_BIT, False, PRECISION)
    q_rep = tl.reshape(tl.broadcast_to(q[None, :, :], (REP, q.shape[0], BLOCK_D)), (REP * q.shape[0], BLOCK_D))
    s_rep = tl.dot(q_rep.to(keys.dtype), tl.trans(keys), input_precision=PRECISION)
    s = tl.max(tl.reshape(s_rep, (REP, q.shape[0], 16)), axis=0) * scale_log2
    pos = cached + new
    allowed = _user_mask(MASK, b, heads, t, row_ok, pos, n_keys, smb, smh, smt, sms, HAS_MASK, MASK_ROW)
    # last <= length - 1 with length = min(cached + pending, n_keys): this also drops the padding rows past the
    # step's tokens and those past the capacity.
    allowed = allowed & (pos[None, :] <= last[:, None])
    return _softmax_block(s, allowed, values, m_i, l_i, acc, REP, PRECISION)


@triton.jit
def _decode_split_kernel(
    Q, KVAL, KIDX, V, LENGTHS, MASK, PARTS, NEW_K, NEW_V,
    scale_log2, topk, head_dim, q_len, group, key_heads, chunk, n_splits, n_parts, pending, n_keys, m_start, l_start,
    sqb, sqh, sqt, sqd,
    skb, skh, sks,
    sib, sih, sis,
    svb, svh, svs,
    smb, smh, smt, sms,
    snkb, snkh, snkn, snkd,
    snvb, snvh, snvn, snvd,
    M_REAL: tl.constexpr, REP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, LOW_BIT: tl.constexpr, HAS_MASK: tl.constexpr, PRESPARSE: tl.constexpr,
    PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr, EVEN_K: tl.constexpr, MASK_ROW: tl.constexpr,
    APPEND: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr,
):
    # Scores and softmax statistics live on the M_REAL (>= group * q_len) query rows only; P is repeated REP
    # times to the 16 rows tensor cores need for P @ V; accumulator rows past group * q_len are not stored.
    # PARTS: one float32 workspace, the partial outputs from 0, their running maxima from m_start, sums from l_start.
    # ``pending``: the decode step's new tokens, appended by the prologue kernel (R) or by program n_splits
    # (APPEND), not yet counted in LENGTHS (the merge kernel advances it); ``n_keys``: the cache's slots, where
    # appends stop.
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // key_heads).to(tl.int64)
    hk = bh % key_heads
    if PREFETCH:  # the split's first key block, into L2 while the query loads and takes its top-k
        first = tl.minimum(split * chunk + tl.arange(0, BLOCK_N), n_keys - 1)
        lines = tl.minimum(tl.arange(0, LINES) * LINE, head_dim - 1)
        _prefetch_l2(V + b * svb + hk * svh + first[:, None] * svs + lines[None, :])
        _prefetch_l2(KVAL + b * skb + hk * skh + first * sks)
        _prefetch_l2(KIDX + b * sib + hk * sih + first * sis)
    if PDL:  # launched before the kernel ahead finished (programmatic dependent launch): nothing above reads or
        gdc_wait()  # writes what that kernel may still write or read
    rows = tl.arange(0, M_REAL)
    g = rows // q_len
    t = rows % q_len
    row_ok = rows < group * q_len
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    q_ok = row_ok[:, None] & col_ok[None, :]
    heads = hk * group + g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + t[:, None] * sqt + cols[None, :] * sqd, mask=q_ok, other=0.0)
    if PRESPARSE:  # projected and sparsified by _decode_prologue_kernel: at most topk non-zeros per row
        q = q.to(tl.float32)
    else:
        q = tl.where(topk_keep(q, q_ok, topk, LOW_BIT), q.to(tl.float32), 0.0)

    cached = tl.load(LENGTHS + b)
    length = tl.minimum(cached + pending, n_keys)
    last = length - q_len + t  # the last key each row sees (causal, aligned to the sequence end)
    start = split * chunk
    # APPEND: the new tokens are not in the cache yet, program n_splits attends to them (its range is empty:
    # n_splits * chunk >= n_keys).
    stop = tl.minimum(start + chunk, cached if APPEND else length)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < topk
    v_base = V + b * svb + hk * svh
    m_i = tl.full([M_REAL], float("-inf"), tl.float32)
    l_i = tl.zeros([M_REAL], tl.float32)
    acc = tl.zeros([M_REAL * REP, BLOCK_D], tl.float32)
    # The mask is loaded one block ahead: the pipeliner leaves byte-wise loads synchronous, each would stall its block.
    user = _user_mask(MASK, b, heads, t, row_ok, start + tl.arange(0, BLOCK_N), n_keys, smb, smh, smt, sms, HAS_MASK,
                      MASK_ROW)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        # The compressed rows must load as vectors for the pipeliner to prefetch them asynchronously like V: with
        # a power-of-two topk the mask is constant along the row, and row offsets are declared multiples of
        # ROW_ALIGN (host-checked). Otherwise they load byte-wise and synchronously, which is slower.
        if EVEN_K:
            nk_ok = tl.broadcast_to(n_ok[:, None], (BLOCK_N, BLOCK_K))
        else:
            nk_ok = n_ok[:, None] & k_ok[None, :]
        kval_rows = tl.multiple_of(b * skb + hk * skh + offs_n * sks, [ROW_ALIGN])
        kidx_rows = tl.multiple_of(b * sib + hk * sih + offs_n * sis, [ROW_ALIGN])
        kval = tl.load(KVAL + kval_rows[:, None] + kk[None, :], mask=nk_ok, other=0.0).to(tl.float32)
        kidx = tl.load(KIDX + kidx_rows[:, None] + kk[None, :], mask=nk_ok, other=0).to(tl.int32)
        v = tl.load(v_base + offs_n[:, None] * svs + cols[None, :], mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        # scores[m, n] = sum_j kval[n, j] * q[m, kidx[n, j]]: gathered from the register tile.
        index = tl.broadcast_to(tl.reshape(kidx, (1, BLOCK_N * BLOCK_K)), (M_REAL, BLOCK_N * BLOCK_K))
        picked = tl.reshape(tl.gather(q, index, axis=1), (M_REAL, BLOCK_N, BLOCK_K))
        # Padding lanes hold value 0 and index 0: their products are 0 (q is finite), so no select is needed.
        s = tl.sum(picked * kval[None, :, :], axis=2) * scale_log2
        allowed = user & n_ok[None, :] & (offs_n[None, :] <= last[:, None])
        user = _user_mask(MASK, b, heads, t, row_ok, offs_n + BLOCK_N, n_keys, smb, smh, smt, sms, HAS_MASK, MASK_ROW)
        m_i, l_i, acc = _softmax_block(s, allowed, v, m_i, l_i, acc, REP, PRECISION)

    if APPEND:
        if split == n_splits:
            m_i, l_i, acc = _attend_new_tokens(q, NEW_K, NEW_V, KVAL, KIDX, V, MASK, b, hk, heads, t, row_ok, last,
                                               cached, pending, n_keys, m_i, l_i, acc, scale_log2, head_dim, topk,
                                               snkb, snkh, snkn, snkd, snvb, snvh, snvn, snvd, skb, skh, sks,
                                               sib, sih, sis, svb, svh, svs, smb, smh, smt, sms, REP, BLOCK_D,
                                               LOW_BIT, HAS_MASK, MASK_ROW, PRECISION)
    if PDL:  # the merge kernel may launch now (it waits for this grid's results); earlier, its programs would take
        gdc_launch_dependents()  # multiprocessor slots from the splits still streaming keys
    part = (bh * n_parts + split).to(tl.int64) * (group * q_len) + rows
    acc_rows = tl.arange(0, M_REAL * REP)
    acc_part = (bh * n_parts + split).to(tl.int64) * (group * q_len) + acc_rows
    acc_ok = (acc_rows < group * q_len)[:, None] & col_ok[None, :]
    tl.store(PARTS + acc_part[:, None] * head_dim + cols[None, :], acc, mask=acc_ok)
    tl.store(PARTS + m_start + part, m_i, mask=row_ok)
    tl.store(PARTS + l_start + part, l_i, mask=row_ok)


@triton.jit
def _load_rows(X, row_offsets, sxd, row_ok, r_base, srf, sre, head_dim, BLOCK_D: tl.constexpr, HAS_R: tl.constexpr,
               PRECISION: tl.constexpr):
    """Rows X[row_offsets] (d features ``sxd`` apart; zeros where not ``row_ok``), with HAS_R times R of one key
    head (>= 16 rows: tl.dot), accumulated in float32 and rounded to X's dtype, as x @ R.to(x.dtype)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    x = tl.load(X + row_offsets[:, None] + cols[None, :] * sxd, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_R:
        r = tl.load(r_base + cols[:, None] * srf + cols[None, :] * sre, mask=col_ok[:, None] & col_ok[None, :],
                    other=0.0)
        x = tl.dot(x, r.to(X.dtype.element_ty), input_precision=PRECISION).to(X.dtype.element_ty)
    return x


@triton.jit
def _sparse_query_rows(Q, R, OUT, b, hk, topk, head_dim, q_len, group, key_heads,
                       sqb, sqh, sqt, sqd, srh, srf, sre,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, PRECISION: tl.constexpr):
    """The query rows of one (sequence, key head), projected by R, all but their top-k features zeroed,
    written contiguous (B, Hq, T, d) for the split kernel (PRESPARSE), so no split program repeats the top-k."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < group * q_len
    heads = hk * group + rows // q_len
    t = rows % q_len
    cols = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (cols < head_dim)[None, :]
    q = _load_rows(Q, b * sqb + heads * sqh + t * sqt, sqd, row_ok, R + hk * srh, srf, sre, head_dim, BLOCK_D, True,
                   PRECISION)
    q = tl.where(topk_keep(q, ok, topk, LOW_BIT), q, 0.0)
    out_rows = (b * key_heads * group + heads) * q_len + t
    tl.store(OUT + out_rows[:, None] * head_dim + cols[None, :], q, mask=ok)


@triton.jit
def _append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, b, h, n, row_ok, start, head_dim, topk, capacity,
                 skb, skh, skn, skd, svb, svh, svn, svd, srh, srf, sre, ckb, ckh, cks, cib, cih, cis, cvb, cvh, cvs,
                 BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, HAS_R: tl.constexpr, PRECISION: tl.constexpr):
    """New tokens ``n`` (>= 16 rows, ``row_ok`` real) of one (sequence, key head): keys projected by R when given,
    their top-k values and ascending indices written at slots start + n, V copied; slots past ``capacity`` are
    dropped. Returns (the sparsified keys, zero past the capacity; the values in the cache's dtype)."""
    cols = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (cols < head_dim)[None, :]
    x = _load_rows(KEYS, b * skb + h * skh + n * skn, skd, row_ok, R + h * srh, srf, sre, head_dim, BLOCK_D, HAS_R,
                   PRECISION)
    keep = topk_keep(x, ok, topk, LOW_BIT)
    slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # ascending feature order
    pos = start + n
    row_ok = row_ok & (pos < capacity)  # a full fixed cache under torch.compile: drop, never write past it
    ok = ok & row_ok[:, None]
    keep = keep & row_ok[:, None]
    tl.store(KVAL + b * ckb + h * ckh + (pos * cks)[:, None] + slot, x.to(KVAL.dtype.element_ty), mask=keep)
    tl.store(KIDX + b * cib + h * cih + (pos * cis)[:, None] + slot, cols[None, :].to(KIDX.dtype.element_ty)
             + tl.zeros_like(slot).to(KIDX.dtype.element_ty), mask=keep)
    v = tl.load(VALUES + b * svb + h * svh + n[:, None] * svn + cols[None, :] * svd, mask=ok, other=0.0)
    v = v.to(VCACHE.dtype.element_ty)
    tl.store(VCACHE + b * cvb + h * cvh + (pos * cvs)[:, None] + cols[None, :], v, mask=ok)
    return tl.where(keep, x, 0.0), v


@triton.jit
def _decode_prologue_kernel(
    Q, R, QOUT, KEYS, VALUES, KVAL, KIDX, VCACHE, LENGTHS,
    topk, head_dim, q_len, group, key_heads, new_tokens, capacity,
    sqb, sqh, sqt, sqd,
    srh, srf, sre,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    ckb, ckh, cks,
    cib, cih, cis,
    cvb, cvh, cvs,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (sequence, key head): program column 0 sparsifies the query rows; column 1 (a decode step's grid
    only) appends the step's <= 16 new tokens at the sequence's length, which it does not advance."""
    bh = tl.program_id(0)
    b = (bh // key_heads).to(tl.int64)
    hk = bh % key_heads
    if tl.program_id(1) == 0:
        _sparse_query_rows(Q, R, QOUT, b, hk, topk, head_dim, q_len, group, key_heads, sqb, sqh, sqt, sqd, srh, srf,
                           sre, BLOCK_M, BLOCK_D, LOW_BIT, PRECISION)
    else:
        n = tl.arange(0, 16)
        _append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, b, hk, n, n < new_tokens, tl.load(LENGTHS + b), head_dim,
                     topk, capacity, skb, skh, skn, skd, svb, svh, svn, svd, srh, srf, sre, ckb, ckh, cks, cib, cih,
                     cis, cvb, cvh, cvs, BLOCK_D, LOW_BIT, True, PRECISION)


@triton.jit
def _decode_combine_kernel(
    PARTS, OUT, LENGTHS,
    head_dim, q_len, group, key_heads, n_splits, pending, n_keys, m_start, l_start,
    sob, soh, sot, sod,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ADVANCE: tl.constexpr, PDL: tl.constexpr,
):
    # One program per (sequence, key head, group row) and BLOCK_D feature columns: more programs with fewer bytes
    # each, and the partial outputs are loaded before the statistics' reductions, so the loads overlap.
    if PDL:  # launched while the split kernel runs: wait for its results
        gdc_wait()
    row = tl.program_id(0)  # over (sequence, key head, group row)
    rows_per_head = group * q_len
    bh = row // rows_per_head
    r = row % rows_per_head
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < n_splits
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    part = (bh * n_splits + splits).to(tl.int64) * rows_per_head + r
    o = tl.load(PARTS + part[:, None] * head_dim + cols[None, :], mask=s_ok[:, None] & col_ok[None, :], other=0.0)
    m = tl.load(PARTS + m_start + part, mask=s_ok, other=float("-inf"))
    l_part = tl.load(PARTS + l_start + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)
    total = tl.sum(w * l_part, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total == 0.0, 1.0, total)  # fully masked rows: zeros
    b = (bh // key_heads).to(tl.int64)
    head = (bh % key_heads) * group + r // q_len
    t = r % q_len
    tl.store(OUT + b * sob + head * soh + t * sot + cols * sod, out.to(OUT.dtype.element_ty), mask=col_ok)
    if ADVANCE:  # a decode step: count its appended tokens, once per sequence (the split kernel is done reading)
        first = (bh % key_heads == 0) & (r == 0) & (tl.program_id(1) == 0)
        tl.store(LENGTHS + b, tl.minimum(tl.load(LENGTHS + b) + pending, n_keys).to(tl.int32), mask=first)


def _row_alignment(*strides: int) -> int:
    """The largest power of two up to 16 dividing every stride: what the split kernel may assume of the offsets
    of compressed key rows (in elements)."""
    align = 16
    while any(stride % align for stride in strides):
        align //= 2
    return align


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _programmatic_launch(device: int) -> bool:
    """Programmatic dependent launch (CUDA, Hopper and later): a kernel launches while the one before it on the
    stream finishes, and waits for it in-kernel (``gdc_wait``), hiding the launch latency between them."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_config(batch_heads: int, n_keys: int, topk: int, score_rows: int, append: bool,
                   num_splits: Optional[int], block_n: Optional[int], num_warps: Optional[int],
                   num_stages: Optional[int], device: int, interpret: bool) -> tuple[int, int, int, int]:
    """(splits, key block, warps, stages), each unless given; chosen by sweeps (benchmarks/RESULTS.md, LOG.md).

    With >= 16 (sequence, key head) pairs, <= 4 score rows and topk <= 16: about two programs per multiprocessor
    (long splits: fewer partial results to merge), 4 warps, 3 stages, 64-key blocks up to topk 8 and 128-key blocks
    up to topk 16. Otherwise about four programs per multiprocessor with splits of >= 128 keys: 64-key blocks,
    4 warps, 2 stages up to topk 8; 32-key blocks, 2 warps, 3 stages above; splits still >= 4096 keys long are
    split four times further, with the tiles above where swept, else 32-key blocks, 2 warps, 2 stages. When the
    split kernel ``append``s a step's new tokens, their program counts in the programs per multiprocessor (one
    more would wait for a second wave), and four programs per multiprocessor take 32-key blocks, 2 warps, 3 stages
    at every topk."""
    if interpret:
        return num_splits or max(1, min(4, cdiv(n_keys, 16))), block_n or 16, num_warps or 4, num_stages or 1
    sms = _multiprocessors(device)
    measured = score_rows <= 4 and topk <= 16
    wide = (64 if topk <= 8 else 128), 4, 3
    if batch_heads >= 16 and measured:
        splits = max(1, min(2 * sms // batch_heads - append, cdiv(n_keys, _MIN_SPLIT_TOKENS)))
        block, warps, stages = wide
    else:
        splits = max(1, min(cdiv(4 * sms, batch_heads) - append, cdiv(n_keys, _MIN_SPLIT_TOKENS)))
        if cdiv(max(n_keys, 1), splits) >= _LONG_SPLIT_TOKENS:
            splits *= 4
            block, warps, stages = wide if measured else (32, 2, 2)
        else:
            block, warps, stages = (64, 4, 2) if topk <= 8 and not append else (32, 2, 3)
    return num_splits or splits, block_n or block, num_warps or warps, num_stages or stages


def _split_config(batch_heads: int, n_keys: int, rows: int, head_dim: int, topk: int, append: bool,
                  num_splits: Optional[int], block_n: Optional[int], num_warps: Optional[int],
                  num_stages: Optional[int], device: int, interpret: bool) -> tuple[int, int, int, int, int]:
    """(splits, key block, warps, stages, score rows) of a split-kernel launch: ``_launch_config`` and the score
    rows its warps allow."""
    splits, block_n, num_warps, num_stages = _launch_config(batch_heads, n_keys, topk,
                                                            _score_rows(rows, head_dim, topk), append, num_splits,
                                                            block_n, num_warps, num_stages, device, interpret)
    return splits, block_n, num_warps, num_stages, _score_rows(rows, head_dim, topk, num_warps)


def _broadcast_strides(mask: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``mask`` expanded over its size-1 dims (0 there): what the split kernel indexes it by."""
    return tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))


class _Plan(NamedTuple):
    """What a decode call launches, by its shapes and settings (``_plan``): grids, launch settings, the split
    length, and where the partial outputs and softmax statistics sit in the one float32 workspace."""

    prologue_grid: tuple
    prologue: Optional[LaunchConfig]
    split_grid: tuple
    split: LaunchConfig
    merge_grid: tuple
    merge: LaunchConfig
    splits: int
    parts: int
    chunk: int
    m_start: int
    l_start: int
    workspace: int


@functools.lru_cache(maxsize=1024)
def _plan(batch: int, q_heads: int, q_len: int, head_dim: int, key_heads: int, n_keys: int, topk: int,
          dtype: torch.dtype, step: bool, presparse: bool, has_mask: bool, mask_row: bool, row_strides: tuple,
          num_splits: Optional[int], block_n: Optional[int], num_warps: Optional[int], num_stages: Optional[int],
          device: int) -> _Plan:
    """The launch plan of ``decode``, memoized: a fixed cache asks the same every step, a growing one once per step
    for all layers (``device``: the current CUDA device, -1 under the interpreter)."""
    interpret = _SPLIT.interpret
    group = q_heads // key_heads
    rows = group * q_len
    block_d = feature_block(head_dim)
    low_bit = LOW_BIT[dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    pdl = not interpret and _programmatic_launch(device)
    append = step and not presparse  # else the prologue appends
    prologue = _PROLOGUE.config(dict(BLOCK_M=max(next_power_of_2(rows), 16), BLOCK_D=block_d, LOW_BIT=low_bit,
                                     PRECISION=precision), 4, 3) if presparse else None
    splits, block_n, num_warps, num_stages, m_real = _split_config(
        batch * key_heads, n_keys, rows, head_dim, topk, append, num_splits, block_n, num_warps, num_stages, device,
        interpret)
    parts = splits + append
    block_k = max(next_power_of_2(topk), 2)
    line = 128 // dtype.itemsize
    split = _SPLIT.config(dict(
        M_REAL=m_real, REP=max(1, 16 // m_real), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, LOW_BIT=low_bit,
        HAS_MASK=has_mask, PRESPARSE=presparse, PRECISION=precision, ROW_ALIGN=_row_alignment(*row_strides),
        EVEN_K=block_k == topk, MASK_ROW=mask_row, APPEND=append,
        PREFETCH=n_keys > 0 and not interpret and torch.version.hip is None, LINES=cdiv(block_d, line), LINE=line,
        PDL=pdl), num_warps, num_stages, pdl)
    merge_cols = min(block_d, _MERGE_COLUMNS)
    merge = _COMBINE.config(dict(BLOCK_S=max(next_power_of_2(parts), 2), BLOCK_D=merge_cols, ADVANCE=step, PDL=pdl),
                            4, 3, pdl)
    # The partial outputs and their softmax statistics in one allocation, passed once with the statistics' offsets
    # (three views of it cost host time every call); each part starts 64-byte aligned, so that 16 divides the
    # offsets and Triton specializes the kernels on it alike at every size.
    n_rows = batch * key_heads * parts * rows
    m_start = cdiv(n_rows * head_dim, 16) * 16
    l_start = m_start + cdiv(n_rows, 16) * 16
    return _Plan((batch * key_heads, 2 if step else 1), prologue, (parts, batch * key_heads), split,
                 (batch * key_heads * rows, block_d // merge_cols), merge, splits, parts,
                 cdiv(cdiv(max(n_keys, 1), splits), block_n) * block_n, m_start, l_start, l_start + n_rows)


def decode(query: torch.Tensor, key_values: torch.Tensor, key_indices: torch.Tensor, value: torch.Tensor,
           lengths: torch.Tensor, topk: int, scale: float, attn_mask: Optional[torch.Tensor],
           projection: Optional[torch.Tensor] = None, new_keys: Optional[torch.Tensor] = None,
           new_values: Optional[torch.Tensor] = None, num_splits: Optional[int] = None, block_n: Optional[int] = None,
           num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """Attention of (B, Hq, T, d) queries (projected by ``projection[key head]`` first when given) over the
    compressed cache; arguments checked by the op. With ``new_keys`` and ``new_values`` (B, Hk, <= 16 tokens, d),
    a decode step: they are appended at each sequence's length first (as ``append_compressed``), attended, and
    ``lengths`` advance by their count (at most to the slot count). Runs once per layer of every generation step,
    so the host work is kept small: a memoized launch plan, one workspace allocation, and kernels launched through
    ``Launcher``."""
    batch, q_heads, q_len, head_dim = query.shape
    step = new_keys is not None
    if projection is not None and head_dim > _MAX_FUSED_PROJECTION_DIM:
        if step:
            new_keys = project_by_key_head(new_keys, projection)
        query, projection = project_by_key_head(query, projection), None
    key_heads, n_keys = key_values.size(1), key_values.size(2)
    group = q_heads // key_heads
    pending = new_keys.size(2) if step else 0
    new_keys, new_values = (new_keys, new_values) if step else (query, query)
    kv_strides, ki_strides, v_strides = key_values.stride()[:3], key_indices.stride()[:3], value.stride()[:3]
    mask_row = False
    if attn_mask is not None:
        mask_arg, mask_strides = attn_mask.view(torch.uint8), _broadcast_strides(attn_mask)
        mask_row = mask_strides[1] == 0 and (q_len == 1 or mask_strides[2] == 0)
    else:
        mask_arg, mask_strides = lengths, (0, 0, 0, 0)
    plan = _plan(batch, q_heads, q_len, head_dim, key_heads, n_keys, topk, query.dtype, step, projection is not None,
                 attn_mask is not None, mask_row, kv_strides + ki_strides, num_splits, block_n, num_warps, num_stages,
                 -1 if _SPLIT.interpret else torch.cuda.current_device())
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if projection is not None:
        sparse_query = torch.empty_like(query, memory_format=torch.contiguous_format)
        _PROLOGUE(plan.prologue_grid, (
            query, projection, sparse_query, new_keys, new_values, key_values, key_indices, value, lengths, topk,
            head_dim, q_len, group, key_heads, pending, n_keys, *query.stride(), *projection.stride(),
            *new_keys.stride(), *new_values.stride(), *kv_strides, *ki_strides, *v_strides,
        ), plan.prologue)
        query = sparse_query
    workspace = torch.empty(plan.workspace, dtype=torch.float32, device=query.device)
    _SPLIT(plan.split_grid, (
        query, key_values, key_indices, value, lengths, mask_arg, workspace, new_keys, new_values,
        scale * 1.4426950408889634, topk, head_dim, q_len, group, key_heads, plan.chunk, plan.splits, plan.parts,
        pending, n_keys, plan.m_start, plan.l_start, *query.stride(), *kv_strides, *ki_strides, *v_strides,
        *mask_strides, *new_keys.stride(), *new_values.stride(),
    ), plan.split)
    _COMBINE(plan.merge_grid, (
        workspace, out, lengths, head_dim, q_len, group, key_heads, plan.parts, pending, n_keys, plan.m_start,
        plan.l_start, *out.stride(),
    ), plan.merge)
    return out


# Keyed by value except the arguments that change from step to step (a growing cache's slot count and what follows
# from it: splits, their length, the mask's strides).
_PROLOGUE = Launcher(_decode_prologue_kernel, pointers=9, varying=("capacity",))
_SPLIT = Launcher(_decode_split_kernel, pointers=9, varying=(
    "scale_log2", "chunk", "n_splits", "n_parts", "n_keys", "m_start", "l_start", "smb", "smh", "smt", "sms"))
_COMBINE = Launcher(_decode_combine_kernel, pointers=3, varying=("n_splits", "n_keys", "m_start", "l_start"))


@triton.jit
def _append_kernel(
    KEYS, VALUES, R, KVAL, KIDX, VCACHE, STARTS, COUNTS,
    key_heads, length, head_dim, topk, capacity,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srf, sre,
    ckb, ckh, cks,
    cib, cih, cis,
    cvb, cvh, cvs,
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
    _append_rows(KEYS, VALUES, R, KVAL, KIDX, VCACHE, b, h, n, row_ok, tl.load(STARTS + b), head_dim, topk, capacity,
                 skb, skh, skn, skd, svb, svh, svn, svd, srh, srf, sre, ckb, ckh, cks, cib, cih, cis, cvb, cvh, cvs,
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
    if projection is not None and head_dim > _MAX_FUSED_PROJECTION_DIM:
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
_APPEND = Launcher(_append_kernel, pointers=8, varying=("length", "capacity", "skb", "skh", "skn", "svb", "svh", "svn"))
