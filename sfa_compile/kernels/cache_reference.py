"""The compressed key cache's operations in plain PyTorch: read it back dense, append tokens, advance lengths.

The reference the cache kernels are tested against and the CPU path of the ops; the container
(kv_cache.CompressedKVCache) holds the tensors these read and write.
"""

from __future__ import annotations

from typing import Optional

import torch

from .compressed import densify, sparsify
from .limits import FP8_VALUE_DTYPE, FP8_VALUE_MAX
from .topk import project_by_key_head


def quantize_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 rows, float32 scales) of (..., d) ``values``: each row divided by its largest magnitude / 448 (exact IEEE
    division in float32, rounded to nearest e4m3fn); an all-zero row gets scale 0 and zeros."""
    v = values.float()
    scales = v.abs().amax(dim=-1) / FP8_VALUE_MAX
    divisor = torch.where(scales > 0, scales, 1.0)
    return (v / divisor[..., None]).to(FP8_VALUE_DTYPE), scales


def dequantize_values(quantized: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``quantized`` rows times their ``scales``, in float32, then ``dtype``."""
    return (quantized.float() * scales[..., None]).to(dtype)


def dense_cache(key_values: torch.Tensor, key_indices: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                head_dim: int, value_scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (keys, values) of a cache layout (batch, key heads, slots, ...): keys scattered back to
    ``head_dim`` features, FP8 values dequantized by their ``value_scales`` to the keys' dtype; slots at or past
    ``lengths[b]`` hold garbage and come back as zeros."""
    if value_scales is not None:
        values = dequantize_values(values, value_scales, key_values.dtype)
    valid = (torch.arange(values.size(2), device=values.device)[None, :] < lengths[:, None])[:, None, :, None]
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    keys = densify(torch.where(valid, key_values, zero), torch.where(valid, key_indices.to(torch.int64), 0), head_dim)
    return keys, torch.where(valid, values, zero)


def append_reference(key_values: torch.Tensor, key_indices: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     new_keys: torch.Tensor, new_values: torch.Tensor, counts: Optional[torch.Tensor],
                     projection: Optional[torch.Tensor] = None, value_scales: Optional[torch.Tensor] = None) -> None:
    """The ``sfa::compressed_cache_append`` op in PyTorch: write at each sequence's length (FP8 values quantized,
    their scales into ``value_scales``), advance it."""
    if projection is not None:
        new_keys = project_by_key_head(new_keys, projection)
    length, capacity = new_keys.size(2), values.size(2)
    compressed = sparsify(new_keys, key_values.size(-1))
    if value_scales is not None:
        new_values, new_scales = quantize_values(new_values)
    counts_list = [length] * new_keys.size(0) if counts is None else counts.tolist()
    for b, (start, count) in enumerate(zip(lengths.tolist(), counts_list)):
        n = max(0, min(count, capacity - start))
        key_values[b, :, start:start + n] = compressed.values[b, :, :n].to(key_values.dtype)
        key_indices[b, :, start:start + n] = compressed.indices[b, :, :n].to(key_indices.dtype)
        values[b, :, start:start + n] = new_values[b, :, :n].to(values.dtype)
        if value_scales is not None:
            value_scales[b, :, start:start + n] = new_scales[b, :, :n]
    advance_lengths(lengths, length, counts, capacity)


def advance_lengths(lengths: torch.Tensor, length: int, counts: Optional[torch.Tensor], capacity: int) -> None:
    """After an append: every sequence grew by ``length`` tokens (or ``counts[b]``), at most to the capacity."""
    lengths.add_(length if counts is None else counts).clamp_(max=capacity)
