"""Training terms collected from SFA layers during a forward pass.

- The paper's Eq. 8: mean over SFA layers and heads of ||O_sfa - stopgrad(O_dense)||^2. Inside
  ``attention_distillation(model)``, every SFA layer of the converted model also computes its dense attention output
  from the same (projected) queries and keys with SDPA under no_grad (flash or memory-efficient kernels: no
  score matrix is materialized) and adds the squared error of its per-head outputs. Since R is orthogonal,
  dense scores from projected q and k equal the original model's.
- The dropped energy (ours): mean over SFA layers, heads and tokens of the share of each projected query's and
  key's squared norm that top-k drops. Penalizing it pushes the model and R to concentrate each row in fewer
  features; with straight-through top-k this is SR-STE's decay of the pruned entries (Zhou et al. 2021).

    with attention_distillation(model) as distill:
        out = model(**batch)
        loss = task_loss(out) + lam * distill.loss() + mu * distill.dropped_energy()
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..kernels.topk import select_mask
from .observers import observe


def dropped_energy(x: torch.Tensor, topk: int) -> torch.Tensor:
    """Mean over rows of ||x - topk(x)||^2 / ||x||^2 (0 when nothing is dropped; all-zero rows count 0)."""
    x = x.float()
    energy = x.square()
    dropped = torch.where(select_mask(x.detach(), topk), 0.0, energy).sum(-1)
    return (dropped / energy.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


class AttentionDistillation:
    """Collects the per-layer terms of the forward passes run inside its block."""

    def __init__(self, sparsity: bool = False):
        self.sparsity = sparsity
        self.terms: list[torch.Tensor] = []
        self.dropped: list[torch.Tensor] = []

    def __call__(self, module, query, key, value, attention_mask, output, sdpa_kwargs) -> None:
        sfa = getattr(module, "sfa", None)
        if sfa is None:
            return
        with torch.no_grad():
            dense = F.scaled_dot_product_attention(query, key, value, **{**sdpa_kwargs, "dropout_p": 0.0})
        # Squared L2 norm of each head's output vector, averaged over batch, heads and tokens.
        self.terms.append((output.float() - dense.float()).square().sum(-1).mean())
        if self.sparsity:
            self.dropped.append((dropped_energy(query, sfa.topk) + dropped_energy(key, sfa.topk)) / 2)

    @staticmethod
    def _pop(terms: list[torch.Tensor]) -> torch.Tensor:
        if not terms:
            raise RuntimeError("attention_distillation: no SFA layer ran inside the block; is the model converted?")
        loss = torch.stack(terms).mean()
        terms.clear()
        return loss

    def loss(self) -> torch.Tensor:
        """The Eq. 8 term: mean of the collected layer terms; clears them (call once per step)."""
        return self._pop(self.terms)

    def dropped_energy(self) -> torch.Tensor:
        """The dropped-energy term (needs ``sparsity=True``): mean over layers; clears them."""
        if not self.sparsity:
            raise RuntimeError("attention_distillation: pass sparsity=True to collect the dropped energy")
        return self._pop(self.dropped)


@contextlib.contextmanager
def attention_distillation(model: torch.nn.Module, sparsity: bool = False):
    """Collect the Eq. 8 terms of ``model``'s SFA layers over the forward passes inside the block."""
    distill = AttentionDistillation(sparsity)
    with observe(model, distill):
        yield distill
