"""Straight-through top-k for fine-tuning, and the attention call every SFA site makes.

SFA's gradient reaches only the kept features (DESIGN.md section 1), so training can sharpen the features
already kept but never learns that a dropped one should have been kept. Inside ``straight_through_topk(model)``,
SFA sites instead sparsify q and k with a straight-through estimator (Bengio et al. 2013; as SR-STE trains
N:M sparse weights): the forward pass is unchanged (the same top-k values, exact softmax), while a dropped
feature receives the gradient it would get if it were kept, so features can enter and leave the kept set.
``finetune(..., straight_through=True)`` uses it; measured on all-MiniLM-L6-v2 in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch

from ..functional import flash_sfa
from ..kernels.topk import select_mask
from .observers import marked

STRAIGHT_THROUGH = "_sfa_straight_through"  # attribute of a module inside straight_through_topk(model)


def straight_through_topk(model: torch.nn.Module):
    """``model``'s SFA sites run with straight-through top-k gradients inside the block."""
    return marked(model, STRAIGHT_THROUGH, lambda old: True)


def straight_through_on(module: torch.nn.Module) -> bool:
    """Whether the attention layer ``module`` runs inside ``straight_through_topk`` of its model."""
    return getattr(module, STRAIGHT_THROUGH, False)


def _straight_through(x: torch.Tensor, topk: int) -> torch.Tensor:
    """x's top-k features (the others 0) in the forward pass; the identity's gradient in the backward pass.
    Dropped features are finite (inf and NaN always rank first), so ``x - x.detach()`` is exactly 0 there."""
    return torch.where(select_mask(x.detach(), topk), x, x - x.detach())


def sfa_attention(query, key, value, *, topk: int, straight_through: bool = False, **sdpa_kwargs) -> torch.Tensor:
    """``flash_sfa`` of projected q and k, or with ``straight_through`` the same forward values as dense attention
    (``flash_sfa`` at topk = d) on straight-through sparsified q and k: its backward then gives every feature a
    gradient. Not SDPA's own autograd: it hands cuDNN output gradients in another layout than the output's, which
    gave wrong gradients on an H100 (benchmarks/LOG.md); the op's backward passes both contiguous."""
    if not straight_through or not torch.is_grad_enabled():
        return flash_sfa(query, key, value, topk=topk, **sdpa_kwargs)
    return flash_sfa(_straight_through(query, topk), _straight_through(key, topk), value, topk=query.size(-1),
                     **sdpa_kwargs)
