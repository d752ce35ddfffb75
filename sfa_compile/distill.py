"""The paper's Eq. 8 distillation term: mean over SFA layers and heads of ||O_sfa - stopgrad(O_dense)||^2.

Inside ``attention_distillation()``, every SFA layer of a converted Hugging Face model also computes its
dense attention output from the same (projected) queries and keys with SDPA under no_grad (flash or
memory-efficient kernels: no score matrix is materialized) and adds the squared error of its per-head
outputs. Since R is orthogonal, dense scores from projected q and k equal the original model's.

    with attention_distillation() as distill:
        out = model(**batch)
        loss = task_loss(out) + lam * distill.loss()
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .observers import observe


class AttentionDistillation:
    """Collects the per-layer Eq. 8 terms of the forward passes run inside its block."""

    def __init__(self):
        self.terms: list[torch.Tensor] = []

    def __call__(self, module, query, key, value, attention_mask, output, sdpa_kwargs) -> None:
        if getattr(module, "sfa", None) is None:
            return
        with torch.no_grad():
            dense = F.scaled_dot_product_attention(query, key, value, **{**sdpa_kwargs, "dropout_p": 0.0})
        # Squared L2 norm of each head's output vector, averaged over batch, heads and tokens.
        self.terms.append((output.float() - dense.float()).square().sum(-1).mean())

    def loss(self) -> torch.Tensor:
        """Mean of the collected layer terms; clears them (call once per step)."""
        if not self.terms:
            raise RuntimeError("attention_distillation: no SFA layer ran inside the block; is the model converted?")
        loss = torch.stack(self.terms).mean()
        self.terms = []
        return loss


@contextlib.contextmanager
def attention_distillation():
    distill = AttentionDistillation()
    with observe(distill):
        yield distill
