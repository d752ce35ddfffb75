"""The CUDA implementation of ``sfa::flash_sfa`` and its backward: Triton top-k, then Triton flash attention.

Brings the op's SDPA-style arguments (any number of batch dims, broadcasting, GQA, masks) to the 4-D
layout the kernels take, without copying when the inputs already have it. What the kernels do not cover
runs on the pure-PyTorch reference, with a one-time warning that names the reason: float64, dropout,
head dims above 256 and gradients with respect to the mask. Empty inputs take the reference silently.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .checks import default_scale, gqa_group_size, output_shape, score_shape
from .limits import KERNEL_DTYPES, MAX_HEAD_DIM
from .reference import flash_sfa_backward_reference, flash_sfa_reference
from .triton_prefill import flash_forward
from .triton_prefill_backward import flash_backward
from .triton_topk import sparsify_triton

_warned: set = set()


def unsupported_reason(query, key, value, dropout_p: float) -> Optional[str]:
    """Why the Triton kernels cannot run these arguments, or None when they can."""
    if query.dtype not in KERNEL_DTYPES:
        return f"{query.dtype} inputs (the kernels take float16, bfloat16 and float32)"
    if dropout_p > 0.0:
        return "dropout_p > 0 (the kernels implement no dropout)"
    if max(query.size(-1), value.size(-1)) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM}"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"sfa::flash_sfa on CUDA: {reason} runs on the pure-PyTorch reference (same result, slower, "
            "memory linear in the key length per query chunk)",
            stacklevel=3,
        )


def _is_empty(query, key, value) -> bool:
    return query.numel() == 0 or key.numel() == 0 or value.numel() == 0


def _four_d(x: torch.Tensor, batch: list, rows: int = -1, cols: int = -1) -> torch.Tensor:
    """``x`` (..., N, E) broadcast to batch + (rows, cols) (-1: keep x's) and viewed as (B, H, N, E);
    broadcast dims keep stride 0. More than two batch dims are flattened, which copies only when they
    were broadcast."""
    x = x.expand(*batch, rows, cols)
    if len(batch) < 2:
        return x.reshape((1,) * (2 - len(batch)) + tuple(x.shape))
    return x.flatten(0, len(batch) - 2)


def _layout(query, key, value, enable_gqa):
    """(batch dims of the scores, batch dims of K/V): K/V keep their own head count under GQA."""
    batch = score_shape(query, key, value, enable_gqa)[:-2]
    kv_batch = batch[:-1] + [key.size(-3)] if gqa_group_size(query, key, enable_gqa) > 1 else batch
    return batch, kv_batch


def _sparsify(x: torch.Tensor, topk: int, want_keep: bool = False):
    if topk >= x.size(-1):
        return x, None
    return sparsify_triton(x, topk, want_keep)


def forward(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed):
    """(out, lse) of ``sfa::flash_sfa`` (arguments already validated)."""
    reason = unsupported_reason(query, key, value, dropout_p)
    if reason is not None or _is_empty(query, key, value):
        if reason is not None:
            _warn_once(reason)
        return flash_sfa_reference(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                   dropout_seed)
    batch, kv_batch = _layout(query, key, value, enable_gqa)
    q_sparse, _ = _sparsify(_four_d(query, batch), topk)
    k_sparse, _ = _sparsify(_four_d(key, kv_batch), topk)
    mask = None if attn_mask is None else _four_d(attn_mask, batch, query.size(-2), key.size(-2))
    out, lse = flash_forward(q_sparse, k_sparse, _four_d(value, kv_batch), mask, is_causal,
                             default_scale(query, scale))
    return out.reshape(output_shape(query, key, value, enable_gqa)), lse.reshape(*batch, query.size(-2))


def backward(grad_out, query, key, value, out, lse, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa,
             dropout_seed, mask_grad):
    """(dq, dk, dv, d_mask or None) of ``sfa::flash_sfa``, gradients only through kept features."""
    reason = unsupported_reason(query, key, value, dropout_p)
    if reason is None and mask_grad:
        reason = "gradients with respect to attn_mask"
    if reason is not None or _is_empty(query, key, value):
        if reason is not None:
            _warn_once(reason)
        return flash_sfa_backward_reference(grad_out, query, key, value, topk, attn_mask, dropout_p, is_causal,
                                            scale, enable_gqa, dropout_seed, mask_grad)
    batch, kv_batch = _layout(query, key, value, enable_gqa)
    q_sparse, q_keep = _sparsify(_four_d(query, batch), topk, want_keep=True)
    k_sparse, k_keep = _sparsify(_four_d(key, kv_batch), topk, want_keep=True)
    mask = None if attn_mask is None else _four_d(attn_mask, batch, query.size(-2), key.size(-2))
    lse4 = _four_d(lse.unsqueeze(-1), batch).squeeze(-1).contiguous()
    dq, dk, dv = flash_backward(_four_d(grad_out, batch), q_sparse, k_sparse, _four_d(value, kv_batch),
                                _four_d(out, batch), lse4, mask, is_causal, default_scale(query, scale))
    if q_keep is not None:
        dq.masked_fill_(~q_keep, 0)
    if k_keep is not None:
        dk.masked_fill_(~k_keep, 0)
    length, keys = query.size(-2), key.size(-2)
    dq = dq.reshape(*batch, length, query.size(-1)).sum_to_size(query.shape)
    dk = dk.reshape(*kv_batch, keys, key.size(-1)).sum_to_size(key.shape)
    dv = dv.reshape(*kv_batch, keys, value.size(-1)).sum_to_size(value.shape)
    return dq, dk, dv, None
