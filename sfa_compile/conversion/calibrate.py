"""Fit the learned top-k projections R of a converted model from example inputs.

Two stages, both on the calibration inputs only:
1. Principal axes: per layer and key head, the eigenvectors of Cq/tr(Cq) + Ck/tr(Ck), the second-moment
   matrices of the (post-RoPE) queries of the head's group and of its keys, by decreasing eigenvalue. Energy
   concentrates in few coordinates, so top-k keeps more of each dot product.
2. Refinement (``steps`` > 0, on by default in ``convert``): each layer's R alone, trained under an orthogonal
   parametrization to minimise the Eq. 8 distillation loss (SFA vs dense attention output of that layer),
   starting from the principal axes. The layer's queries, keys and values are recorded once on the calibration
   inputs, so a step is one attention call, not a pass through the model (what made whole-model refinement too
   slow to be a default); layers are recorded a few at a time within a memory budget.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..kernels.prefill import additive_mask
from ..kernels.topk import project_by_key_head
from ..projection import SFAProjection, orthogonal_training
from ..training.model_call import call_model, trains
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


REFINE_STEPS = 300  # per layer; with REFINE_LR, measured on all-MiniLM-L6-v2 (benchmarks/RESULTS.md)
REFINE_LR = 3e-3
RECORD_BYTES = 2 << 30  # recorded q/k/v per refinement pass at most (layers are recorded a few at a time)


@trains
def calibrate(model, calibration: Iterable, steps: int = 0, lr: float = REFINE_LR, progress: bool = True):
    """Set every runtime projection of the converted ``model`` from ``calibration`` (an iterable of examples);
    returns the model. ``steps`` > 0 adds the layer-local Eq. 8 refinement (``steps`` per layer)."""
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


class _Recorder:
    """Per SFA layer in ``wanted``: the examples' (q, k, v, attention kwargs, dense output), q and k before R."""

    def __init__(self, wanted: set):
        self.wanted, self.records = wanted, {}

    def __call__(self, module, query, key, value, attention_mask, output, sdpa_kwargs) -> None:
        sfa = getattr(module, "sfa", None)
        if sfa not in self.wanted:
            return
        r_inverse = sfa.weight.detach().transpose(-1, -2)  # R is orthogonal: q and k before it are x R^T
        q, k = project_by_key_head(query.detach(), r_inverse), project_by_key_head(key.detach(), r_inverse)
        v = value.detach()
        kwargs = {name: (x.detach() if torch.is_tensor(x) else x) for name, x in sdpa_kwargs.items()}
        kwargs["dropout_p"] = 0.0
        if "attn_mask" in kwargs:  # additive once, not at every step
            kwargs["attn_mask"] = additive_mask(kwargs["attn_mask"], q.dtype)
        target = F.scaled_dot_product_attention(q, k, v, **kwargs)  # dense: R does not change it
        self.records.setdefault(sfa, []).append((q, k, v, kwargs, target))


def _record_bytes(model, example, layers: list) -> int:
    """Bytes one example records for one layer (q, k, v and the dense output), measured on ``example``."""
    recorder = _Recorder({layers[0]})
    with torch.no_grad(), observe(model, recorder):
        call_model(model, example)
    return sum(t.numel() * t.element_size() for record in recorder.records.get(layers[0], [])
               for t in (record[0], record[1], record[2], record[4]))


def refine(model, examples: list, steps: int, lr: float = REFINE_LR, progress: bool = True) -> None:
    """Train each runtime projection R alone on the Eq. 8 loss of its layer (kept orthogonal), from the layer's
    recorded queries, keys and values on ``examples``; ``steps`` Adam steps per layer, one example each."""
    from ..functional import flash_sfa

    layers = [m.sfa for m in model.modules()  # topk = head dim drops nothing: there is nothing to refine
              if isinstance(getattr(m, "sfa", None), SFAProjection) and m.sfa.weight is not None
              and m.sfa.topk < m.sfa.head_dim]
    if not layers:
        return
    per_layer = max(1, _record_bytes(model, examples[0], layers) * len(examples))
    group = max(1, RECORD_BYTES // per_layer)
    bar = progress_bar(range(len(layers) * steps), "calibrating: refining R", progress)
    ticks = iter(bar)
    for start in range(0, len(layers), group):
        recorder = _Recorder(set(layers[start:start + group]))
        with torch.no_grad(), observe(model, recorder):
            for example in examples:
                call_model(model, example)
        for sfa, records in recorder.records.items():
            with orthogonal_training([sfa]) as params:
                optimizer = torch.optim.Adam(params, lr=lr)
                for step in range(steps):
                    q, k, v, kwargs, target = records[step % len(records)]
                    with parametrize.cached():  # R computed once per step, not once per use
                        out = flash_sfa(sfa.project(q), sfa.project(k), v, topk=sfa.topk, **kwargs)
                    loss = (out - target).square().mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    torch.clear_autocast_cache()  # a caller's autocast would keep casts of the old R otherwise
                    next(ticks, None)
    if hasattr(bar, "close"):
        bar.close()
