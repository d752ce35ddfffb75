"""FlashSFA decode over the compressed key cache (``sfa::flash_sfa_decode`` and ``sfa::flash_sfa_decode_step`` on
CUDA): the host side that plans and launches the kernels of ``triton_decode_kernels`` (split + merge) and
``triton_append`` (prologue), and the cache's append (``append_compressed``).

A decode step (``decode`` given the step's new keys and values): without R, one more program per (sequence, key
head) of the split kernel appends them at the sequence's length and attends to them from registers, while the
others stream the tokens cached before; with R, the prologue kernel appends them (its second program column) and
the split kernel counts them in each sequence's length. The merge kernel advances the device lengths. A whole step
of one layer is two launches without R, three with.
"""

from __future__ import annotations

from typing import Optional

import torch

from .decode_launch import COMBINE, PROLOGUE, SPLIT, broadcast_strides, decode_plan
from .limits import LOG2E, MAX_FUSED_PROJECTION_DIM
from .topk import project_by_key_head
from .triton_append import append_compressed, scale_args

__all__ = ["append_compressed", "decode"]


def decode(query: torch.Tensor, key_values: torch.Tensor, key_indices: torch.Tensor, value: torch.Tensor,
           lengths: torch.Tensor, topk: int, scale: float, attn_mask: Optional[torch.Tensor],
           projection: Optional[torch.Tensor] = None, new_keys: Optional[torch.Tensor] = None,
           new_values: Optional[torch.Tensor] = None, value_scales: Optional[torch.Tensor] = None,
           num_splits: Optional[int] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
           num_stages: Optional[int] = None) -> torch.Tensor:
    """Attention of (B, Hq, T, d) queries (projected by ``projection[key head]`` first when given) over the
    compressed cache; arguments checked by the op. With ``new_keys`` and ``new_values`` (B, Hk, <= 16 tokens, d),
    a decode step: they are appended at each sequence's length first (as ``append_compressed``), attended, and
    ``lengths`` advance by their count (at most to the slot count). ``value_scales``: the values are FP8, each
    cached row times its scale. ``num_splits`` ... ``num_stages``: launch settings instead of the plan's (sweeps,
    tests; ``decode_plan``). Runs once per layer of every generation step, so the host work is kept small: a
    memoized launch plan, one workspace allocation, and kernels launched through ``Launcher``."""
    batch, q_heads, q_len, head_dim = query.shape
    step = new_keys is not None
    if projection is not None and head_dim > MAX_FUSED_PROJECTION_DIM:
        if step:
            new_keys = project_by_key_head(new_keys, projection)
        query, projection = project_by_key_head(query, projection), None
    key_heads, n_keys = key_values.size(1), key_values.size(2)
    group = q_heads // key_heads
    pending = new_keys.size(2) if step else 0
    new_keys, new_values = (new_keys, new_values) if step else (query, query)
    kv_strides, ki_strides, v_strides = key_values.stride()[:3], key_indices.stride()[:3], value.stride()[:3]
    scales_arg, vs_strides = scale_args(value_scales, lengths)
    mask_row = False
    if attn_mask is not None:
        mask_arg, mask_strides = attn_mask.view(torch.uint8), broadcast_strides(attn_mask)
        mask_row = mask_strides[1] == 0 and (q_len == 1 or mask_strides[2] == 0)
    else:
        mask_arg, mask_strides = lengths, (0, 0, 0, 0)
    plan = decode_plan(batch, q_heads, q_len, head_dim, key_heads, n_keys, topk, query.dtype, step,
                       projection is not None, attn_mask is not None, mask_row, kv_strides + ki_strides,
                       value_scales is not None, num_splits, block_n, num_warps, num_stages,
                       -1 if SPLIT.interpret else torch.cuda.current_device())
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if projection is not None:
        sparse_query = torch.empty_like(query, memory_format=torch.contiguous_format)
        PROLOGUE(plan.prologue_grid, (
            query, projection, sparse_query, new_keys, new_values, key_values, key_indices, value, scales_arg,
            lengths, topk, head_dim, q_len, group, key_heads, pending, n_keys, *query.stride(), *projection.stride(),
            *new_keys.stride(), *new_values.stride(), *kv_strides, *ki_strides, *v_strides, *vs_strides,
        ), plan.prologue)
        query = sparse_query
    workspace = torch.empty(plan.workspace, dtype=torch.float32, device=query.device)
    SPLIT(plan.split_grid, (
        query, key_values, key_indices, value, scales_arg, lengths, mask_arg, workspace, new_keys, new_values,
        scale * LOG2E, topk, head_dim, q_len, group, key_heads, plan.chunk, plan.splits, plan.parts,
        pending, n_keys, plan.m_start, plan.l_start, *query.stride(), *kv_strides, *ki_strides, *v_strides,
        *vs_strides, *mask_strides, *new_keys.stride(), *new_values.stride(),
    ), plan.split)
    COMBINE(plan.merge_grid, (
        workspace, out, lengths, head_dim, q_len, group, key_heads, plan.parts, pending, n_keys, plan.m_start,
        plan.l_start, *out.stride(),
    ), plan.merge)
    return out
