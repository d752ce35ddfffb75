"""Deterministic top-k feature selection by magnitude (DESIGN.md section 1).

Per row (token and head) keep the ``topk`` coordinates with the largest |x|; among equal magnitudes the
lower coordinate index wins. A stable descending sort gives exactly that order (NaN sorts first, so a
NaN feature is always kept and propagates as it would in dense attention).
"""

from __future__ import annotations

import torch


def topk_indices(x: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (int64, in selection order) of the ``topk`` largest-magnitude features of each row."""
    return torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :topk]


def topk_mask(x: torch.Tensor, topk: int) -> torch.Tensor:
    """Boolean mask of x's shape, True at the kept features of each row."""
    if topk >= x.size(-1):
        return torch.ones_like(x, dtype=torch.bool)
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, topk_indices(x, topk), True)


def project_by_key_head(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, length, d) @ R of each head's key head, R (key heads, d, d) with heads a multiple of key
    heads (the learned projection applied before top-k); in x's dtype, as the kernels compute it."""
    batch, heads, length, dim = x.shape
    key_heads = r.size(0)
    return (x.view(batch, key_heads, heads // key_heads, length, dim) @ r.to(x.dtype)[None, :, None]).view(x.shape)


def sparsify_dense(x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with dropped features set to 0, keep mask). Uses where, not a multiply, so inf/NaN in dropped
    features cannot leak into the result."""
    keep = topk_mask(x, topk)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), keep


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """The True entries of each row of a boolean mask, keepdim, as int32. Summed as bytes: a boolean sum first
    widens the whole mask to int64 (8x its bytes, and several times slower)."""
    wide_enough = torch.uint8 if mask.size(-1) < 256 else torch.int16
    return mask.view(torch.uint8).sum(dim=-1, keepdim=True, dtype=wide_enough).to(torch.int32)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def _kth_largest(bits: torch.Tensor, topk: int) -> torch.Tensor:
    """The ``topk``-th largest of each row of the CPU integer tensor ``bits``, keepdim, through numpy's introselect
    (several times faster than ``torch.topk`` on rows this short), in place: the rows of ``bits`` come back
    reordered (no copy of the whole tensor)."""
    pivot = bits.size(-1) - topk
    rows = bits.numpy()
    rows.partition(pivot, axis=-1)
    return torch.from_numpy(rows[..., pivot:pivot + 1].copy())


def select_mask(x: torch.Tensor, topk: int) -> torch.Tensor:
    """``topk_mask`` without the full sort: the k-th largest magnitude comes from a selection on the bit patterns of
    |x| (non-negative floats order like their bits as integers, NaN above inf, as the stable sort orders them);
    magnitudes equal to it are kept in index order, so the mask equals ``topk_mask`` exactly, ties included. Rows
    without a tie at the threshold (almost all, for real activations) skip the tie-break pass; checking that reads
    a flag back, so this serves the CPU; other devices get ``topk_mask`` (the Triton top-k serves CUDA)."""
    if topk >= x.size(-1) or x.device.type != "cpu":
        return topk_mask(x, topk)
    threshold = _kth_largest(x.abs().view(_BITS[x.dtype]), topk)  # a scratch copy, reordered by the selection
    bits = x.abs().view(_BITS[x.dtype])
    keep = bits >= threshold
    if torch.count_nonzero(keep) > keep.numel() // x.size(-1) * topk:  # ties at the threshold: lowest indices win
        above = bits > threshold
        at = bits == threshold
        room = topk - row_counts(above)
        keep = above | (at & (at.cumsum(dim=-1) <= room))
    return keep


def sparsify_fast(x: torch.Tensor, topk: int) -> torch.Tensor:
    """``sparsify_dense``'s x~ through ``select_mask``, for the run-time path."""
    # where(keep, x, 0) on the bit patterns: the same values (NaN and inf included), several times faster.
    return (x.view(_BITS[x.dtype]) * select_mask(x, topk)).view(x.dtype)


def kept_features(x_sparse: torch.Tensor, topk: int) -> torch.Tensor:
    """The keep mask of the top-k that made ``x_sparse`` (an output of the sparsifiers above), from x~ alone, so a
    backward needs no second top-k: the non-zero features, and in a row with fewer than ``topk`` of them (x had
    fewer non-zeros, so every feature outside the kept set was zero) the lowest-index zeros up to ``topk``, as the
    selection's tie rule kept them. NaN counts as non-zero, as it is always kept."""
    nonzero = x_sparse != 0
    missing = topk - row_counts(nonzero)
    if x_sparse.device.type == "cpu" and not bool((missing > 0).any()):  # the common case, without the scan
        return nonzero
    zero = ~nonzero
    return nonzero | (zero & (zero.cumsum(dim=-1) <= missing))
