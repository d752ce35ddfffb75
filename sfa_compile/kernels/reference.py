"""Pure-PyTorch FlashSFA: the implementation that runs anywhere and the oracle for the Triton kernels.

Math (DESIGN.md section 1): q~ = topk(q), k~ = topk(k), S = q~ k~^T * scale + mask, O = softmax(S) V.
Fully masked rows give zeros and NaN propagates, exactly as SDPA's math backend.

Memory: queries are processed in chunks so that no more than ``SCORE_CHUNK_ELEMENTS`` scores exist at
once (SDPA's math path holds all B*H*L*S of them). GQA never repeats K/V: the query heads of a group are
folded into the row dimension of one matmul against their shared key head. Half-precision inputs are
computed in float32 and rounded once at the end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .cache_reference import dense_cache
from .checks import default_scale, gqa_group_size, output_shape
from .topk import project_by_key_head, sparsify_dense

SCORE_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class _Problem:
    """Inputs in the grouped layout (..., Hk, G, N, E): query heads split into (key head, group), K/V with
    G = 1, at least one batch/head dim, features already sparsified and cast to the compute dtype."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_keep: torch.Tensor  # top-k masks in the caller's layout
    k_keep: torch.Tensor
    mask: Optional[torch.Tensor]  # grouped layout, broadcastable against the grouped scores
    is_causal: bool
    scale: float
    dropout_p: float
    seed: Optional[int]
    ndim: int  # dims of the caller's layout after padding to at least 3
    group: int
    chunk: int  # query rows per chunk

    @property
    def length(self) -> int:
        return self.q.size(-2)

    def grouped(self, x: torch.Tensor, split_heads: bool) -> torch.Tensor:
        """Caller layout (..., H, N, E) -> grouped layout; split_heads for query-side tensors."""
        x = x.reshape((1,) * (self.ndim - x.dim()) + tuple(x.shape))
        if split_heads and self.group > 1 and x.size(-3) > 1:
            return x.unflatten(-3, (x.size(-3) // self.group, self.group))
        return x.unsqueeze(-3)

    def ungrouped(self, x: torch.Tensor, shape) -> torch.Tensor:
        """Grouped-layout gradient -> a tensor of ``shape``, summing over dims that were broadcast."""
        x = x.flatten(-4, -3)
        return x.sum_to_size((1,) * (self.ndim - len(shape)) + tuple(shape)).reshape(shape)


def _prepare(q, k, v, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed) -> _Problem:
    ctype = compute_dtype(q.dtype)
    q_sparse, q_keep = sparsify_dense(q, topk)
    k_sparse, k_keep = sparsify_dense(k, topk)
    out_shape = output_shape(q, k, v, enable_gqa)
    rows_of_scores = math.prod(out_shape[:-2]) * max(k.size(-2), 1)
    p = _Problem(
        q=q_sparse, k=k_sparse, v=v, q_keep=q_keep, k_keep=k_keep, mask=None,
        is_causal=is_causal, scale=default_scale(q, scale), dropout_p=dropout_p,
        seed=None if dropout_seed is None else int(dropout_seed.item()),
        ndim=max(q.dim(), 3), group=gqa_group_size(q, k, enable_gqa),
        chunk=max(1, SCORE_CHUNK_ELEMENTS // max(rows_of_scores, 1)),
    )
    p.q = p.grouped(q_sparse.to(ctype), split_heads=True)
    p.k = p.grouped(k_sparse.to(ctype), split_heads=False)
    p.v = p.grouped(v.to(ctype), split_heads=False)
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(ctype)
        p.mask = p.grouped(mask, split_heads=True)
    return p


def _dropout_multiplier(p: _Problem, probs: torch.Tensor, start: int) -> Optional[torch.Tensor]:
    """keep / (1 - dropout_p) for the chunk starting at query row ``start``, reproducible from the seed."""
    if p.dropout_p == 0.0:
        return None
    if p.dropout_p == 1.0:
        return torch.zeros_like(probs)
    gen = torch.Generator(device=probs.device)
    gen.manual_seed((p.seed * 1_000_003 + start) % (1 << 63))
    keep = torch.rand(probs.shape, generator=gen, device=probs.device, dtype=probs.dtype) >= p.dropout_p
    return keep.to(probs.dtype) / (1.0 - p.dropout_p)


def _chunk_probs(p: _Problem, start: int, stop: int) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Softmax probabilities (grouped layout) of query rows [start, stop), the dropout multiplier, and the
    rows' log-sum-exp of the masked, scaled scores (+inf where every key is masked)."""
    scores = (p.q[..., start:stop, :] @ p.k.transpose(-1, -2)) * p.scale
    if p.mask is not None:
        mask = p.mask[..., start:stop, :] if p.mask.size(-2) > 1 else p.mask
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    if p.is_causal:  # top-left aligned, as SDPA: row i sees keys j <= i
        rows = torch.arange(start, stop, device=scores.device)[:, None]
        cols = torch.arange(scores.size(-1), device=scores.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    if scores.size(-1) == 0:
        return scores, None, scores.new_full(scores.shape[:-1], float("inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    probs = torch.where(denom == 0, torch.zeros_like(exp), exp / denom)  # fully masked row -> 0, as SDPA
    lse = torch.where(denom == 0, float("inf"), row_max + torch.log(denom)).squeeze(-1)
    return probs, _dropout_multiplier(p, probs, start), lse


def _row_chunks(p: _Problem):
    for start in range(0, p.length, p.chunk):
        yield start, min(start + p.chunk, p.length)


def flash_sfa_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk: int,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SFA attention output shaped like SDPA's, float32 log-sum-exp of each query row's scores shaped
    (batch..., L)); arguments already validated."""
    p = _prepare(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed)
    out_shape = output_shape(query, key, value, enable_gqa)
    chunks, lse_chunks = [], []
    for start, stop in _row_chunks(p):
        probs, drop, lse = _chunk_probs(p, start, stop)
        chunks.append((probs if drop is None else probs * drop) @ p.v)
        lse_chunks.append(lse)
    if not chunks:
        return query.new_zeros(out_shape), query.new_zeros(out_shape[:-1], dtype=torch.float32)
    out = torch.cat(chunks, dim=-2).flatten(-4, -3).reshape(out_shape).to(query.dtype)
    lse = torch.cat(lse_chunks, dim=-1).flatten(-3, -2)
    lse = lse.reshape(lse.shape[lse.dim() - len(out_shape) + 1:])  # drop the padding to at least 3 dims
    lse = torch.broadcast_to(lse, out_shape[:-1]).to(torch.float32)  # v's batch dims may broadcast q's
    return out, lse


def flash_sfa_backward_reference(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk: int,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
    dropout_seed: Optional[torch.Tensor],
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (dq, dk, dv, d attn_mask or None) with the top-k index sets held fixed.

    Recomputes the probabilities chunk by chunk (nothing L x S is saved) and uses the softmax identity
    dS = P * (dP - rowsum(P * dP)). Dropped features receive exactly zero gradient.
    """
    p = _prepare(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed)
    d_out = p.grouped(grad_out.to(p.q.dtype), split_heads=True)
    d_mask = torch.zeros_like(p.mask, dtype=p.q.dtype) if mask_grad else None
    dq_chunks, dk, dv = [], 0, 0
    for start, stop in _row_chunks(p):
        probs, drop, _ = _chunk_probs(p, start, stop)
        g = d_out[..., start:stop, :]
        dropped = probs if drop is None else probs * drop
        # Fold the GQA group into the rows so dK and dV sum over the group inside one matmul.
        dv = dv + dropped.flatten(-3, -2).transpose(-1, -2) @ g.flatten(-3, -2)
        d_probs = g @ p.v.transpose(-1, -2)
        if drop is not None:
            d_probs = d_probs * drop
        d_scores = probs * (d_probs - (probs * d_probs).sum(dim=-1, keepdim=True))
        if d_mask is not None:
            if d_mask.size(-2) > 1:
                d_mask[..., start:stop, :] = d_scores.sum_to_size(*d_mask.shape[:-2], stop - start, d_mask.size(-1))
            else:
                d_mask += d_scores.sum_to_size(d_mask.shape)
        d_scores = d_scores * p.scale
        dq_chunks.append(d_scores @ p.k)
        dk = dk + d_scores.flatten(-3, -2).transpose(-1, -2) @ p.q[..., start:stop, :].flatten(-3, -2)

    if not dq_chunks:  # empty query: nothing flows anywhere
        zeros = [torch.zeros_like(t) for t in (query, key, value)]
        return (*zeros, None if attn_mask is None or not mask_grad else torch.zeros_like(attn_mask))
    dq = p.ungrouped(torch.cat(dq_chunks, dim=-2), query.shape)
    dk = p.ungrouped(dk.unsqueeze(-3), key.shape)
    dv = p.ungrouped(dv.unsqueeze(-3), value.shape)
    zero = torch.zeros((), dtype=dq.dtype, device=dq.device)
    dq, dk = torch.where(p.q_keep, dq, zero), torch.where(p.k_keep, dk, zero)
    if d_mask is not None:
        d_mask = d_mask.flatten(-4, -3).reshape(attn_mask.shape).to(attn_mask.dtype)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), d_mask


def flash_sfa_decode_reference(query, key_values, key_indices, value, lengths, topk, scale=None, attn_mask=None,
                               projection=None, value_scales=None):
    """Decode over a compressed cache: queries (B, Hq, T, d), projected by R of their key head when a
    ``projection`` is given, aligned to the end of each sequence (query t sees keys up to lengths[b] - T + t),
    keys restored from (values, indices), FP8 values dequantized by ``value_scales`` to the keys' dtype, then
    ``flash_sfa_reference``."""
    if projection is not None:
        query = project_by_key_head(query, projection)
    q_len = query.size(2)
    keys, value = dense_cache(key_values, key_indices, value, lengths, query.size(3), value_scales)
    positions = torch.arange(keys.size(2), device=query.device)
    last = lengths.to(torch.int64)[:, None] - q_len + torch.arange(q_len, device=query.device)
    allowed = (positions[None, None, :] <= last[:, :, None])[:, None]  # (B, 1, T, S)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    out, _ = flash_sfa_reference(query, keys, value, topk, allowed, 0.0, False, scale,
                                 query.size(1) != keys.size(1), None)
    return out
