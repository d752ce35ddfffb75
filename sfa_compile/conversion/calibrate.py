"""Fit the learned top-k projections R of a converted model from example inputs.

Two stages, both on the calibration inputs only:
1. Principal axes: per layer and key head, the eigenvectors of Cq/tr(Cq) + Ck/tr(Ck), the second-moment
   matrices of the (post-RoPE) queries of the head's group and of its keys, by decreasing eigenvalue. Energy
   concentrates in few coordinates, so top-k keeps more of each dot product.
2. Refinement (``steps`` > 0): R trained by ``finetune`` (projections only, eval mode) under an orthogonal
   parametrization to minimise the Eq. 8 distillation loss (SFA vs dense attention outputs), starting from
   the principal axes.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..projection import SFAProjection
from ..training.finetune import finetune
from ..training.model_call import call_model
from ..training.observers import observe
from ..training.progress import progress_bar


class _MomentCollector:
    def __init__(self):
        self.moments: dict[SFAProjection, list] = {}

    def __call__(self, module, query, key, value, attention_mask, output, sdpa_kwargs) -> None:
        sfa = getattr(module, "sfa", None)
        if sfa is None or sfa.weight is None:
            return
        hk, d = sfa.key_heads, sfa.head_dim
        q = query.detach().double().reshape(query.size(0), hk, -1, d)  # group heads and tokens per key head
        k = key.detach().double()
        cq = torch.einsum("bhnd,bhne->hde", q, q)
        ck = torch.einsum("bhnd,bhne->hde", k, k)
        if sfa in self.moments:
            self.moments[sfa][0] += cq
            self.moments[sfa][1] += ck
        else:
            self.moments[sfa] = [cq, ck]


def principal_axes(cq: torch.Tensor, ck: torch.Tensor) -> torch.Tensor:
    """(key heads, d, d) orthogonal R whose columns are the principal axes of the normalized q and k moments."""
    trace = lambda c: c.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[:, None, None]  # noqa: E731
    eigenvalues, eigenvectors = torch.linalg.eigh(cq / trace(cq) + ck / trace(ck))
    return eigenvectors.flip(-1)  # descending eigenvalues


def calibrate(model, calibration: Iterable, steps: int = 0, lr: float = 1e-3, progress: bool = True):
    """Set every runtime projection of the converted ``model`` from ``calibration`` (an iterable of examples);
    returns the model. ``steps`` > 0 adds the Eq. 8 refinement, cycling over the examples."""
    examples = list(calibration)
    if not examples:
        raise ValueError("calibrate: the calibration set is empty; pass at least one example input")
    was_training = model.training
    model.eval()
    collector = _MomentCollector()
    with torch.no_grad(), observe(model, collector):
        for example in progress_bar(examples, "calibrating: principal axes", progress):
            call_model(model, example)
    for sfa, (cq, ck) in collector.moments.items():
        # Moments were taken in the current basis x R, so the new projection is R times their axes.
        axes = principal_axes(cq, ck).to(sfa.weight.dtype)
        sfa.weight.data.copy_(sfa.weight.data @ axes)
    if steps > 0:
        refine(model, examples, steps, lr, progress)
    model.train(was_training)
    return model


def refine(model, examples: list, steps: int, lr: float, progress: bool = True) -> None:
    """Train only the projections with the Eq. 8 loss (kept orthogonal), in eval mode: no dropout noise."""
    finetune(model, examples, steps, lr=lr, progress=progress, train_mode=False)
