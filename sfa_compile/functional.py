"""``flash_sfa``: the user-facing functional op, a drop-in for scaled_dot_product_attention."""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import ops
from .kernels.checks import check_topk
from .kernels.kv_cache import CompressedKVCache


def flash_sfa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    topk: int,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Sparse Feature Attention with the calling convention of ``F.scaled_dot_product_attention``.

    Per token and head, query and key keep their ``topk`` largest-magnitude features (ties: the lower
    feature index wins); scores use the kept overlaps scaled by 1/sqrt(full head dim) unless ``scale`` is
    given; softmax is exact over all keys and V stays dense. Shapes, mask broadcasting, boolean (True =
    attend) and additive masks, top-left ``is_causal``, GQA and dropout behave as in SDPA. Rows whose keys
    are all masked return zeros and NaN inputs propagate, as in SDPA's math backend. ``topk`` equal to the
    head dim is dense attention.
    """
    # Python-level types are checked here: the dispatcher would reject e.g. a float topk less helpfully.
    check_topk(topk, query.size(-1), "flash_sfa")
    dropout_seed = None
    if dropout_p > 0.0:
        dropout_seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    return ops.flash_sfa_op(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            dropout_seed)[0]


def flash_sfa_decode(query: torch.Tensor, cache: "CompressedKVCache", *, scale: Optional[float] = None,
                     attn_mask: Optional[torch.Tensor] = None, projection: Optional[torch.Tensor] = None,
                     new_keys: Optional[torch.Tensor] = None,
                     new_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SFA of the newest ``query`` tokens (batch, query heads, T <= 16 for the fast path, d) over a
    ``CompressedKVCache`` holding their keys: query t of T attends to the keys up to its own position
    (lengths[b] - T + t), GQA when the cache has fewer heads. ``attn_mask``: optional boolean (True = attend)
    broadcasting to (batch, query heads, T, cached tokens). ``projection``: R (key heads, d, d) the cache's keys
    are appended with; the queries are projected by it inside the kernel.

    ``new_keys`` and ``new_values`` (batch, key heads, T, d): a generation step, whose keys and values are not
    cached yet. They are appended (as ``cache.append``) and attended in the decode kernels' own launches, which
    saves the separate append's launches. Under ``torch.compile`` the cache must have a fixed capacity (its host
    lengths are not read; tokens past the capacity are dropped)."""
    if not isinstance(cache, CompressedKVCache):
        raise TypeError(f"flash_sfa_decode: cache must be a CompressedKVCache (SFACache keeps one per SFA layer), got "
                        f"{type(cache).__name__}")
    if new_keys is None and new_values is None:
        return cache.attend(query, scale, attn_mask, projection)
    if new_keys is None or new_values is None:
        raise ValueError("flash_sfa_decode: new_keys and new_values come together (the step's tokens to append)")
    return cache.step(query, new_keys, new_values, scale, attn_mask, projection,
                      on_device=torch.compiler.is_compiling())
