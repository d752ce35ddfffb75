"""Triton kernels of FlashSFA decode over a compressed key cache (split-KV): the split kernel and the merge kernel.

Decode (query length 1..16): one program per (sequence, key head, split of the cached tokens). It first asks L2 for
its split's first key block (a prefetch nothing waits on), loads the query rows of the key head's whole GQA group
(group x query length rows), takes their top-k in registers (``topk_keep``; with a projection R, the prologue
kernel of ``triton_append`` projects and sparsifies the query rows once per key head instead: R in every split
program costs its 32 KB shared-memory tile, and occupancy), then streams its split of the cache once: per block of
keys it loads the compressed keys (values + indices) and dense V, forms the scores by gathering the kept key
features' query entries from the register tile (``tl.gather``: no scattered global loads), and accumulates P @ V on
tensor cores with an online softmax (P repeated to the 16 rows tl.dot needs when the group has fewer; only the real
rows are gathered and stored). The merge kernel combines the splits' partial results. On Hopper both launch as
programmatic dependents of the kernel before them (PDL): each is scheduled while that one finishes and waits for it
in-kernel, which hides part of the launch gap. Rows are aligned to the end of each sequence (query t of T sees keys
up to length - T + t), sequences have their own lengths, and an optional boolean mask (True = attend) broadcasts
like SDPA's.

A decode step without R: one more program per (sequence, key head) of the split kernel appends the step's new
tokens at the sequence's length and attends to them from registers (``_attend_new_tokens``), while the others
stream the tokens cached before; the merge kernel advances the device lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .triton_append import append_rows
from .triton_topk import topk_keep


@triton.jit
def _prefetch_l2(pointers):
    """Ask L2 for the lines at ``pointers`` (PTX prefetch): nothing waits for them and no register receives them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [pointers], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _user_mask(MASK, b, heads, t, row_ok, offs_n, n_keys, stride_mask_b, stride_mask_h, stride_mask_t, stride_mask_n,
               HAS_MASK: tl.constexpr,
               MASK_ROW: tl.constexpr):
    """The boolean mask (True: attend; all True without one) of the score rows at keys ``offs_n``. Bounded by the
    slot count, not the split: constant over 16 keys, so it loads as vectors; one row for all query rows when it
    does not vary over them (a generation step's)."""
    if HAS_MASK:
        if MASK_ROW:
            user = tl.load(MASK + b * stride_mask_b + offs_n * stride_mask_n, mask=offs_n < n_keys, other=0)
            allowed = tl.broadcast_to((user != 0)[None, :], (heads.shape[0], offs_n.shape[0]))
        else:
            mask_rows = b * stride_mask_b + heads[:, None] * stride_mask_h + t[:, None] * stride_mask_t
            user = tl.load(MASK + mask_rows + offs_n[None, :] * stride_mask_n,
                           mask=row_ok[:, None] & (offs_n < n_keys)[None, :], other=0)
            allowed = user != 0
    else:
        allowed = tl.full((heads.shape[0], offs_n.shape[0]), True, tl.int1)
    return allowed


@triton.jit
def _widen_fp8(v, model_dtype: tl.constexpr):
    """FP8 values in the dtype of the P @ V product: float16 for half-precision models (exact, one conversion
    instruction per two values, where bfloat16 takes several), float32 for float32 models (their precision)."""
    if model_dtype == tl.float32:
        return v.to(tl.float32)
    else:
        return v.to(tl.float16)


@triton.jit
def _gathered_scores(q, kidx, kval, M_REAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """scores[m, n] = sum_j kval[n, j] * q[m, kidx[n, j]], gathered from the register tile ``q`` (M_REAL x BLOCK_D)
    BLOCK_D indices at a time: Triton's warp-local gather shuffles once per source register a lane holds for every
    entry, and Triton 3.9 sizes the layout it gives both source and index by the longer row, so one row of the
    block's BLOCK_N * BLOCK_K indices (512 or more) would cost that many / 32 shuffles per entry, not BLOCK_D / 32."""
    if BLOCK_N * BLOCK_K > BLOCK_D:
        CHUNKS: tl.constexpr = BLOCK_N * BLOCK_K // BLOCK_D
        index = tl.broadcast_to(tl.reshape(kidx, (CHUNKS, 1, BLOCK_D)), (CHUNKS, M_REAL, BLOCK_D))
        source = tl.broadcast_to(q[None, :, :], (CHUNKS, M_REAL, BLOCK_D))
        gathered = tl.permute(tl.gather(source, index, axis=2), (1, 0, 2))
    else:
        gathered = tl.gather(q, tl.broadcast_to(tl.reshape(kidx, (1, BLOCK_N * BLOCK_K)), (M_REAL, BLOCK_N * BLOCK_K)),
                             axis=1)
    picked = tl.reshape(gathered, (M_REAL, BLOCK_N, BLOCK_K))
    return tl.sum(picked * kval[None, :, :], axis=2)


@triton.jit
def _softmax_block(s, allowed, v, v_scale, m_i, l_i, acc, REP: tl.constexpr, PRECISION: tl.constexpr,
                   FP8_V: tl.constexpr):
    """One block of keys into the online softmax: scores ``s`` (M_REAL rows, log2 units) where ``allowed``,
    values ``v``; P is repeated REP times to the >= 16 rows of the tensor-core P @ V. FP8_V: ``v`` holds the FP8
    values widened (``_widen_fp8``), each key's value row times its ``v_scale``: P's columns take the scales
    divided by the block's largest (so P stays in [0, 1], within float16's range) and the product is multiplied
    by it."""
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8_V:
        block_scale = tl.max(v_scale, axis=0)
        p = p * (v_scale / tl.where(block_scale > 0, block_scale, 1.0))[None, :]
    p_rep = tl.reshape(tl.broadcast_to(p[None, :, :], (REP, s.shape[0], s.shape[1])), (REP * s.shape[0], s.shape[1]))
    alpha_rep = tl.reshape(tl.broadcast_to(alpha[None, :], (REP, s.shape[0])), (REP * s.shape[0],))
    pv = tl.dot(p_rep.to(v.dtype), v, input_precision=PRECISION)
    if FP8_V:
        pv = pv * block_scale
    acc = acc * alpha_rep[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _attend_new_tokens(q, NEW_K, NEW_V, KVAL, KIDX, V, VSCALE, MASK, b, hk, heads, t, row_ok, last, cached, pending,
                       n_keys, m_i, l_i, acc, scale_log2, head_dim, topk, stride_newk_b, stride_newk_h, stride_newk_n,
                       stride_newk_d, stride_newv_b, stride_newv_h, stride_newv_n, stride_newv_d,
                       stride_kval_b, stride_kval_h, stride_kval_n, stride_kidx_b, stride_kidx_h, stride_kidx_n,
                       stride_v_b, stride_v_h, stride_v_n, stride_vscale_b, stride_vscale_h, stride_vscale_n,
                       stride_mask_b, stride_mask_h, stride_mask_t, stride_mask_n, REP: tl.constexpr,
                       BLOCK_D: tl.constexpr, LOW_BIT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROW: tl.constexpr,
                       PRECISION: tl.constexpr, FP8_V: tl.constexpr):
    """A decode step's <= 16 new tokens (no projection): appended at the sequence's cached length (as
    _append_rows) and folded into the online softmax from registers. q holds values of the keys' dtype, so the
    tensor-core scores are exact products either way; the REP copies of each score row are equal."""
    new = tl.arange(0, 16)
    keys, values, v_scale = append_rows(NEW_K, NEW_V, NEW_K, KVAL, KIDX, V, VSCALE, b, hk, new, new < pending, cached,
                                        head_dim, topk, n_keys, stride_newk_b, stride_newk_h, stride_newk_n,
                                        stride_newk_d, stride_newv_b, stride_newv_h, stride_newv_n, stride_newv_d, 0,
                                        0, 0, stride_kval_b, stride_kval_h, stride_kval_n, stride_kidx_b,
                                        stride_kidx_h, stride_kidx_n, stride_v_b, stride_v_h, stride_v_n,
                                        stride_vscale_b, stride_vscale_h, stride_vscale_n, BLOCK_D, LOW_BIT, False,
                                        PRECISION, FP8_V)
    if FP8_V:
        values = _widen_fp8(values, keys.dtype)
    q_rep = tl.reshape(tl.broadcast_to(q[None, :, :], (REP, q.shape[0], BLOCK_D)), (REP * q.shape[0], BLOCK_D))
    s_rep = tl.dot(q_rep.to(keys.dtype), tl.trans(keys), input_precision=PRECISION)
    s = tl.max(tl.reshape(s_rep, (REP, q.shape[0], 16)), axis=0) * scale_log2
    pos = cached + new
    allowed = _user_mask(MASK, b, heads, t, row_ok, pos, n_keys, stride_mask_b, stride_mask_h, stride_mask_t,
                         stride_mask_n, HAS_MASK, MASK_ROW)
    # last <= length - 1 with length = min(cached + pending, n_keys): this also drops the padding rows past the
    # step's tokens and those past the capacity.
    allowed = allowed & (pos[None, :] <= last[:, None])
    return _softmax_block(s, allowed, values, v_scale, m_i, l_i, acc, REP, PRECISION, FP8_V)


@triton.jit
def decode_split_kernel(
    Q, KVAL, KIDX, V, VSCALE, LENGTHS, MASK, PARTS, NEW_K, NEW_V,
    scale_log2, topk, head_dim, q_len, group, key_heads, chunk, n_splits, n_parts, pending, n_keys, m_start, l_start,
    stride_q_b, stride_q_h, stride_q_t, stride_q_d,
    stride_kval_b, stride_kval_h, stride_kval_n,
    stride_kidx_b, stride_kidx_h, stride_kidx_n,
    stride_v_b, stride_v_h, stride_v_n,
    stride_vscale_b, stride_vscale_h, stride_vscale_n,
    stride_mask_b, stride_mask_h, stride_mask_t, stride_mask_n,
    stride_newk_b, stride_newk_h, stride_newk_n, stride_newk_d,
    stride_newv_b, stride_newv_h, stride_newv_n, stride_newv_d,
    M_REAL: tl.constexpr, REP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, LOW_BIT: tl.constexpr, HAS_MASK: tl.constexpr, PRESPARSE: tl.constexpr,
    PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr, EVEN_K: tl.constexpr, MASK_ROW: tl.constexpr,
    APPEND: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr,
    FP8_V: tl.constexpr,
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
        _prefetch_l2(V + b * stride_v_b + hk * stride_v_h + first[:, None] * stride_v_n + lines[None, :])
        _prefetch_l2(KVAL + b * stride_kval_b + hk * stride_kval_h + first * stride_kval_n)
        _prefetch_l2(KIDX + b * stride_kidx_b + hk * stride_kidx_h + first * stride_kidx_n)
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
    q_rows = b * stride_q_b + heads[:, None] * stride_q_h + t[:, None] * stride_q_t
    q = tl.load(Q + q_rows + cols[None, :] * stride_q_d, mask=q_ok, other=0.0)
    if PRESPARSE:  # projected and sparsified by the prologue kernel: at most topk non-zeros per row
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
    v_base = V + b * stride_v_b + hk * stride_v_h
    m_i = tl.full([M_REAL], float("-inf"), tl.float32)
    l_i = tl.zeros([M_REAL], tl.float32)
    acc = tl.zeros([M_REAL * REP, BLOCK_D], tl.float32)
    # The mask is loaded one block ahead: the pipeliner leaves byte-wise loads synchronous, each would stall its block.
    user = _user_mask(MASK, b, heads, t, row_ok, start + tl.arange(0, BLOCK_N), n_keys, stride_mask_b, stride_mask_h,
                      stride_mask_t, stride_mask_n, HAS_MASK,
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
        kval_rows = tl.multiple_of(b * stride_kval_b + hk * stride_kval_h + offs_n * stride_kval_n, [ROW_ALIGN])
        kidx_rows = tl.multiple_of(b * stride_kidx_b + hk * stride_kidx_h + offs_n * stride_kidx_n, [ROW_ALIGN])
        kval = tl.load(KVAL + kval_rows[:, None] + kk[None, :], mask=nk_ok, other=0.0).to(tl.float32)
        kidx = tl.load(KIDX + kidx_rows[:, None] + kk[None, :], mask=nk_ok, other=0).to(tl.int32)
        v = tl.load(v_base + offs_n[:, None] * stride_v_n + cols[None, :], mask=n_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if FP8_V:  # the scales fold into P
            v = _widen_fp8(v, Q.dtype.element_ty)
            v_scale = tl.load(VSCALE + b * stride_vscale_b + hk * stride_vscale_h + offs_n * stride_vscale_n,
                              mask=n_ok, other=0.0)
        else:
            v_scale = l_i  # unused
        # Padding lanes hold value 0 and index 0: their products are 0 (q is finite), so no select is needed.
        s = _gathered_scores(q, kidx, kval, M_REAL, BLOCK_N, BLOCK_K, BLOCK_D) * scale_log2
        allowed = user & n_ok[None, :] & (offs_n[None, :] <= last[:, None])
        user = _user_mask(MASK, b, heads, t, row_ok, offs_n + BLOCK_N, n_keys, stride_mask_b, stride_mask_h,
                          stride_mask_t, stride_mask_n, HAS_MASK, MASK_ROW)
        m_i, l_i, acc = _softmax_block(s, allowed, v, v_scale, m_i, l_i, acc, REP, PRECISION, FP8_V)

    if APPEND:
        if split == n_splits:
            m_i, l_i, acc = _attend_new_tokens(q, NEW_K, NEW_V, KVAL, KIDX, V, VSCALE, MASK, b, hk, heads, t, row_ok,
                                               last, cached, pending, n_keys, m_i, l_i, acc, scale_log2, head_dim,
                                               topk, stride_newk_b, stride_newk_h, stride_newk_n, stride_newk_d,
                                               stride_newv_b, stride_newv_h, stride_newv_n, stride_newv_d,
                                               stride_kval_b, stride_kval_h, stride_kval_n,
                                               stride_kidx_b, stride_kidx_h, stride_kidx_n, stride_v_b, stride_v_h,
                                               stride_v_n, stride_vscale_b, stride_vscale_h, stride_vscale_n,
                                               stride_mask_b, stride_mask_h, stride_mask_t, stride_mask_n, REP,
                                               BLOCK_D, LOW_BIT, HAS_MASK, MASK_ROW, PRECISION, FP8_V)
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
def decode_combine_kernel(
    PARTS, OUT, LENGTHS,
    head_dim, q_len, group, key_heads, n_splits, pending, n_keys, m_start, l_start,
    stride_out_b, stride_out_h, stride_out_t, stride_out_d,
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
    tl.store(OUT + b * stride_out_b + head * stride_out_h + t * stride_out_t + cols * stride_out_d,
             out.to(OUT.dtype.element_ty), mask=col_ok)
    if ADVANCE:  # a decode step: count its appended tokens, once per sequence (the split kernel is done reading)
        first = (bh % key_heads == 0) & (r == 0) & (tl.program_id(1) == 0)
        tl.store(LENGTHS + b, tl.minimum(tl.load(LENGTHS + b) + pending, n_keys).to(tl.int32), mask=first)
