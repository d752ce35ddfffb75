"""Compressed feature format: per row, the ``topk`` kept values plus their feature indices.

This is the key-cache format (DESIGN.md section 1): values stay in the model dtype, indices are uint8
when the head dim is <= 256 and int16 otherwise, sorted ascending within each row so kernels can merge
or gather without extra work. ``to_dense`` restores the SFA-sparsified tensor exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from .checks import check_topk
from .limits import MAX_UINT8_INDEX_DIM
from .topk import topk_indices


def index_dtype(head_dim: int) -> torch.dtype:
    """Smallest index dtype that addresses ``head_dim`` features."""
    if head_dim <= MAX_UINT8_INDEX_DIM:
        return torch.uint8
    if head_dim <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    raise ValueError(f"head dim {head_dim} is too large for the compressed format (at most 32768)")


@dataclasses.dataclass(frozen=True)
class CompressedFeatures:
    """Kept values (..., topk) in the source dtype and their indices (..., topk), ascending per row."""

    values: torch.Tensor
    indices: torch.Tensor
    head_dim: int

    @property
    def topk(self) -> int:
        return self.values.size(-1)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()

    def to_dense(self) -> torch.Tensor:
        return densify(self.values, self.indices, self.head_dim)


def sparsify(x: torch.Tensor, topk: int) -> CompressedFeatures:
    """Keep the ``topk`` largest-magnitude features of each row of x (last dim), ties to the lower index."""
    head_dim = x.size(-1)
    check_topk(topk, head_dim, "sparsify")
    indices = topk_indices(x, topk).sort(dim=-1).values
    return CompressedFeatures(x.gather(-1, indices), indices.to(index_dtype(head_dim)), head_dim)


def densify(values: torch.Tensor, indices: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Scatter compressed rows back to dense (..., head_dim) with zeros at dropped features."""
    if values.shape != indices.shape:
        raise ValueError(f"densify: values {tuple(values.shape)} and indices {tuple(indices.shape)} must match")
    dense = values.new_zeros(*values.shape[:-1], head_dim)
    return dense.scatter_(-1, indices.long(), values)
