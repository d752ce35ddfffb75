"""Argument checks and output shapes of ``sfa::flash_sfa``, shared by the fake and the real implementations.

The rules mirror ``torch.nn.functional.scaled_dot_product_attention`` (SDPA): batch dims broadcast as in
its math backend, the mask must broadcast to the (..., L, S) score shape and be bool, float32 or the query
dtype, an explicit mask and ``is_causal`` are exclusive, and GQA groups query heads over key heads at
dim -3. Every violation is a ValueError naming the argument and what is allowed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .limits import FP8_VALUE_DTYPE

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gqa_group_size(query: torch.Tensor, key: torch.Tensor, enable_gqa: bool) -> int:
    """Query heads that share one key/value head (1 without GQA)."""
    if not enable_gqa or query.dim() < 3 or query.size(-3) == key.size(-3):
        return 1
    return query.size(-3) // key.size(-3)


def score_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> list:
    """Shape of the (..., L, S) score tensor after batch-dim broadcasting and GQA head mapping."""
    group = gqa_group_size(query, key, enable_gqa)
    key_batch = list(key.shape[:-2])
    value_batch = list(value.shape[:-2])
    if group > 1:
        key_batch[-1] = key_batch[-1] * group
        value_batch[-1] = value_batch[-1] * group
    shapes = (tuple(query.shape[:-2]), tuple(key_batch), tuple(value_batch))
    if all(type(n) is int for shape in shapes for n in shape) and shapes[0] == shapes[1] == shapes[2]:
        batch = shapes[0]  # the common case, without torch.broadcast_shapes' Python cost (no symbolic sizes here)
    else:
        batch = torch.broadcast_shapes(*shapes)
    return [*batch, query.size(-2), key.size(-2)]


def output_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> list:
    """Shape of the attention output: broadcast batch dims, query length, value head dim."""
    return [*score_shape(query, key, value, enable_gqa)[:-1], value.size(-1)]


def default_scale(query: torch.Tensor, scale: Optional[float]) -> float:
    """1/sqrt(full head dim) unless the caller set a scale (SFA keeps the dense scale, not 1/sqrt(topk))."""
    return scale if scale is not None else 1.0 / math.sqrt(query.size(-1))


def check_topk(topk, head_dim: int, caller: str) -> None:
    # SymInt: torch.compile makes an int dynamic once it has seen it change (models with different topk).
    if isinstance(topk, bool) or not isinstance(topk, (int, torch.SymInt)) or not 1 <= topk <= head_dim:
        raise ValueError(f"{caller}: topk must be an integer in [1, head dim = {head_dim}], got {topk!r}")


def check_flash_sfa_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk: int,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
) -> None:
    """Raise ValueError for anything SDPA would reject or SFA cannot express."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"flash_sfa: {name} has dtype {t.dtype}; supported dtypes are "
                "float16, bfloat16, float32 and float64"
            )
        if t.dim() < 2:
            raise ValueError(f"flash_sfa: {name} must have at least 2 dims (..., length, features), got {t.dim()}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            "flash_sfa: query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "flash_sfa: query, key and value must be on one device, got "
            f"{query.device}, {key.device} and {value.device}"
        )
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            "flash_sfa: query, key and value must have the same number of dims, got "
            f"{query.dim()}, {key.dim()} and {value.dim()}"
        )
    head_dim = query.size(-1)
    if key.size(-1) != head_dim:
        raise ValueError(
            f"flash_sfa: query and key must have the same head dim (last dim), got {head_dim} and {key.size(-1)}"
        )
    if key.size(-2) != value.size(-2):
        raise ValueError(
            "flash_sfa: key and value must have the same length (dim -2), got "
            f"{key.size(-2)} and {value.size(-2)}"
        )
    check_topk(topk, head_dim, "flash_sfa")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"flash_sfa: dropout_p must be in [0, 1], got {dropout_p}")
    if enable_gqa and query.dim() >= 3:
        q_heads, k_heads, v_heads = query.size(-3), key.size(-3), value.size(-3)
        if k_heads != v_heads:
            raise ValueError(
                f"flash_sfa: with enable_gqa, key and value must have the same number of heads, got {k_heads} and "
                f"{v_heads}"
            )
        if q_heads % k_heads != 0:
            raise ValueError(
                f"flash_sfa: with enable_gqa, key heads ({k_heads}) must divide query heads ({q_heads})"
            )
    try:
        scores = score_shape(query, key, value, enable_gqa)
    except RuntimeError as err:
        raise ValueError(
            "flash_sfa: the batch dims of query, key and value do not broadcast: "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} ({err})"
        ) from None
    if attn_mask is None:
        return
    if is_causal:
        raise ValueError("flash_sfa: pass either attn_mask or is_causal=True, not both (as in SDPA)")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise ValueError(
            f"flash_sfa: attn_mask must be bool, float32 or the query dtype ({query.dtype}), got {attn_mask.dtype}"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"flash_sfa: attn_mask is on {attn_mask.device}, query on {query.device}; move it")
    broadcast_error = attn_mask.dim() > len(scores)
    if not broadcast_error:
        try:
            broadcast_error = list(torch.broadcast_shapes(tuple(attn_mask.shape), tuple(scores))) != scores
        except RuntimeError:
            broadcast_error = True
    if broadcast_error:
        raise ValueError(
            f"flash_sfa: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the score "
            f"shape {tuple(scores)} (batch..., query length, key length)"
        )


def _check_projection(name: str, projection: Optional[torch.Tensor], key_heads: int, head_dim: int) -> None:
    """R of every key head, (key heads, d, d), floating point (or None); its device is checked with the others."""
    if projection is not None and (projection.shape != (key_heads, head_dim, head_dim)
                                   or not projection.is_floating_point()):
        raise ValueError(f"{name}: projection must be a float tensor (key heads {key_heads}, d {head_dim}, d "
                         f"{head_dim}), got {projection.dtype} {tuple(projection.shape)}")


def check_decode_args(query, key_values, key_indices, value, lengths, topk, attn_mask, projection=None,
                      value_scales=None, name: str = "flash_sfa_decode", others: tuple = ()) -> None:
    """Raise ValueError for decode inputs that do not form one compressed cache and query block (``others``: more
    tensors that must share their device)."""
    if query.dim() != 4 or key_values.dim() != 4 or key_indices.shape != key_values.shape or value.dim() != 4:
        raise ValueError(f"{name}: query (B, Hq, T, d), key_values and key_indices (B, Hk, S, topk) and value "
                         f"(B, Hk, S, d) expected, got {tuple(query.shape)}, {tuple(key_values.shape)}, "
                         f"{tuple(key_indices.shape)}, {tuple(value.shape)}")
    batch, q_heads, q_len, head_dim = query.shape
    b, key_heads, n_keys, stored_topk = key_values.shape
    if value.shape != (b, key_heads, n_keys, head_dim) or b != batch:
        raise ValueError(f"{name}: value must be (B={batch}, Hk={key_heads}, S={n_keys}, d={head_dim}), "
                         f"got {tuple(value.shape)}")
    if q_heads % key_heads:
        raise ValueError(f"{name}: key heads ({key_heads}) must divide query heads ({q_heads})")
    check_topk(topk, head_dim, name)
    if stored_topk != topk:
        raise ValueError(f"{name}: the cache stores {stored_topk} features per key, topk is {topk}")
    if query.dtype not in SUPPORTED_DTYPES or key_values.dtype != query.dtype \
            or value.dtype not in (query.dtype, FP8_VALUE_DTYPE):
        raise ValueError(f"{name}: query, key_values and value must share one float dtype (value may be "
                         f"float8_e4m3fn), got {query.dtype}, {key_values.dtype}, {value.dtype}")
    _check_value_scales(name, value, value_scales)
    if key_indices.dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"{name}: key_indices must be uint8 or int16, got {key_indices.dtype}")
    _check_lengths(name, "lengths", lengths, batch)
    _check_one_device(name, query, key_values, key_indices, value, lengths, attn_mask, projection, value_scales,
                      *others)
    _check_projection(name, projection, key_heads, head_dim)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"{name}: attn_mask must be boolean (True = attend), got {attn_mask.dtype}")
        # Compared size by size: torch.broadcast_shapes is slow for a check paid in every layer of a decode step.
        target = (batch, q_heads, q_len, n_keys)
        if attn_mask.dim() != 4 or not all(size == 1 or size == want for size, want in zip(attn_mask.shape, target)):
            raise ValueError(f"{name}: attn_mask {tuple(attn_mask.shape)} must be 4-D and broadcast to "
                             f"{(batch, q_heads, q_len, n_keys)}")


def check_append_args(key_values, key_indices, values, lengths, new_keys, new_values, counts,
                      projection=None, value_scales=None) -> None:
    """Raise ValueError for new keys/values that do not fit a compressed cache's layout."""
    name = "compressed_cache_append"
    batch, key_heads, _, head_dim = values.shape
    _check_new_tokens(name, values, new_keys, new_values)
    if key_values.shape[:3] != values.shape[:3] or key_indices.shape != key_values.shape:
        raise ValueError(f"{name}: cache buffers {tuple(key_values.shape)}, {tuple(key_indices.shape)}, "
                         f"{tuple(values.shape)} do not form one cache")
    _check_lengths(name, "lengths", lengths, batch)
    if counts is not None:
        _check_lengths(name, "counts", counts, batch)
    _check_value_scales(name, values, value_scales)
    _check_one_device(name, key_values, key_indices, values, lengths, new_keys, new_values, counts, projection,
                      value_scales)
    _check_projection(name, projection, key_heads, head_dim)


def check_step_args(query, key_values, key_indices, value, lengths, new_keys, new_values, topk, attn_mask,
                    projection=None, value_scales=None) -> None:
    """Raise ValueError for a decode step's inputs: ``check_decode_args`` of the query and cache, and the step's
    new keys and values as ``check_append_args`` takes them (each condition checked once: in every layer of every
    eager generation step)."""
    name = "flash_sfa_decode_step"
    check_decode_args(query, key_values, key_indices, value, lengths, topk, attn_mask, projection, value_scales,
                      name, (new_keys, new_values))
    _check_new_tokens(name, value, new_keys, new_values)


def _check_new_tokens(name: str, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor) -> None:
    batch, key_heads, _, head_dim = values.shape
    if new_keys.dim() != 4 or new_keys.shape[:2] != (batch, key_heads) or new_keys.size(3) != head_dim \
            or new_values.shape != new_keys.shape:
        raise ValueError(f"{name}: keys {tuple(new_keys.shape)} and values {tuple(new_values.shape)} must both be "
                         f"(batch {batch}, key heads {key_heads}, tokens, head dim {head_dim})")


def _check_value_scales(name: str, values: torch.Tensor, scales: Optional[torch.Tensor]) -> None:
    """FP8 cached values come with their float32 scale per (sequence, key head, slot); other values with none."""
    fp8 = values.dtype == FP8_VALUE_DTYPE
    if fp8 != (scales is not None):
        raise ValueError(f"{name}: value_scales must be given exactly when the cached values are float8_e4m3fn "
                         f"(values are {values.dtype}, value_scales {'given' if scales is not None else 'None'})")
    if fp8 and (scales.dtype != torch.float32 or scales.shape != values.shape[:3]):
        raise ValueError(f"{name}: value_scales must be float32 of shape {tuple(values.shape[:3])} (batch, key heads, "
                         f"slots), got {scales.dtype} {tuple(scales.shape)}")


def _check_lengths(name: str, label: str, t: torch.Tensor, batch: int) -> None:
    if t.shape != (batch,) or t.dtype != torch.int32:
        raise ValueError(f"{name}: {label} must be int32 of shape ({batch},), got {t.dtype} {tuple(t.shape)}")


def _check_one_device(name: str, *tensors: Optional[torch.Tensor]) -> None:
    tensors = [t for t in tensors if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{name}: all inputs must be on one device, got {[str(t.device) for t in tensors]}")
