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


def sparsify_dense(x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with dropped features set to 0, keep mask). Uses where, not a multiply, so inf/NaN in dropped
    features cannot leak into the result."""
    keep = topk_mask(x, topk)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), keep
