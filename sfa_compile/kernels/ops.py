"""Registration of the custom ops, once, for every device: ``sfa::flash_sfa`` and its backward,
``sfa::flash_sfa_decode`` (attention over a compressed key cache), ``sfa::compressed_cache_append`` and
``sfa::flash_sfa_decode_step`` (append a step's keys and values, then attend: what a generation step calls).

The op returns (output, lse, q~, k~): lse is the float32 log-sum-exp of each query row's masked, scaled scores as
the engine that ran the call computed it (prefill.py), q~ and k~ the sparsified query and key (empty when topk >=
d), all saved for the backward so that it recomputes neither the softmax normalizer nor the top-k (it reads the
keep masks from q~ and k~; autograd keeps them instead of q and k); callers use output only. The fake
implementation (shapes only) is the single source of output shapes, used by torch.compile, torch.export and the
FX passes. Every device runs ``prefill``: top-k of q and k, then the fastest dense attention engine that takes the
call (SDPA's backends, our Triton kernels on CUDA, imported on first use so that machines without Triton never
need them), else the pure-PyTorch reference. Dropout randomness enters as an explicit seed tensor so the op stays
a pure function of its inputs (recomputable in the backward, checkable by opcheck, traceable by export).

The three decode ops are inference-only and run once per layer of every generation step, so they are defined
with torch.library's lower-level API (``_inference_op``) instead of ``torch.library.custom_op``, whose Python
dispatch layers cost an eager call several times the host time, most when the op mutates arguments.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import prefill
from .cache_reference import advance_lengths, append_reference
from .checks import (
    check_append_args,
    check_decode_args,
    check_flash_sfa_args,
    check_step_args,
    default_scale,
    output_shape,
    score_shape,
)
from .limits import KERNEL_DTYPES, MAX_HEAD_DIM, MAX_QUERY_LENGTH
from .reference import flash_sfa_decode_reference


def _check(query, key, value, topk, attn_mask, dropout_p, is_causal, enable_gqa, dropout_seed) -> None:
    check_flash_sfa_args(query, key, value, topk, attn_mask, dropout_p, is_causal, enable_gqa)
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("sfa::flash_sfa: dropout_p > 0 needs a dropout_seed tensor (sfa_compile.flash_sfa makes one)")


@torch.library.custom_op("sfa::flash_sfa", mutates_args=())
def flash_sfa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk: int,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(query, key, value, topk, attn_mask, dropout_p, is_causal, enable_gqa, dropout_seed)
    return prefill.forward(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed)


@flash_sfa_op.register_fake
def _flash_sfa_fake(query, key, value, topk, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, dropout_seed=None):
    _check(query, key, value, topk, attn_mask, dropout_p, is_causal, enable_gqa, dropout_seed)
    lse_shape = score_shape(query, key, value, enable_gqa)[:-1]
    q_shape, k_shape = prefill.sparse_shapes(query, key, value, topk, enable_gqa)
    return (query.new_empty(output_shape(query, key, value, enable_gqa)),
            query.new_empty(lse_shape, dtype=torch.float32), query.new_empty(q_shape), key.new_empty(k_shape))


@torch.library.custom_op("sfa::flash_sfa_backward", mutates_args=())
def flash_sfa_backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    topk: int,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
    dropout_seed: Optional[torch.Tensor],
    mask_grad: bool,
    query_shape: list[int],
    key_shape: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d attn_mask) of q and k shaped ``query_shape``, ``key_shape``; the last is an empty tensor
    unless mask_grad. ``query``, ``key``: the forward's q~, k~ (q, k when topk >= d). The engine is the forward's
    (the reference recomputes the probabilities and ignores ``out`` and ``lse``)."""
    dq, dk, dv, d_mask = prefill.backward(grad_out, query, key, value, out, lse, topk, attn_mask, dropout_p,
                                          is_causal, scale, enable_gqa, dropout_seed, mask_grad, query_shape,
                                          key_shape)
    return dq, dk, dv, query.new_empty(0) if d_mask is None else d_mask.contiguous()


def _backward_engine(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, mask_grad) -> Optional[str]:
    """The engine of a CPU backward, for the fake (it decides the gradients' layout: ``prefill.gradient_strides``);
    None on other devices, whose gradients are contiguous."""
    if query.device.type != "cpu":
        return None
    return prefill.engine_for(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, mask_grad)


@flash_sfa_backward_op.register_fake
def _flash_sfa_backward_fake(grad_out, query, key, value, out, lse, topk, attn_mask, dropout_p, is_causal, scale,
                             enable_gqa, dropout_seed, mask_grad, query_shape, key_shape):
    engine = _backward_engine(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, mask_grad)
    grads = [like.new_empty(shape) if (strides := prefill.gradient_strides(shape, engine)) is None
             else like.new_empty_strided(shape, strides)
             for shape, like in ((query_shape, query), (key_shape, key), (list(value.shape), value))]
    d_mask = attn_mask.new_empty(attn_mask.shape) if mask_grad else query.new_empty(0)
    return (*grads, d_mask)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed = inputs
    out, lse, q_sparse, k_sparse = output
    dense = topk >= query.size(-1)  # nothing dropped: q~, k~ are empty and the backward reads q, k
    ctx.save_for_backward(query if dense else q_sparse, key if dense else k_sparse, value, out, lse, attn_mask,
                          dropout_seed)
    ctx.settings = (topk, dropout_p, is_causal, scale, enable_gqa, list(query.shape), list(key.shape))
    ctx.mask_grad = attn_mask is not None and attn_mask.requires_grad
    ctx.mark_non_differentiable(lse, q_sparse, k_sparse)
    ctx.set_materialize_grads(False)  # else autograd hands the backward zero tensors for lse, q~ and k~


def _backward(ctx, grad_out, _grad_lse, _grad_q_sparse, _grad_k_sparse):
    if grad_out is None:  # an undefined output gradient (gradcheck checks that case): no contribution
        return (None,) * 10
    query, key, value, out, lse, attn_mask, dropout_seed = ctx.saved_tensors
    topk, dropout_p, is_causal, scale, enable_gqa, query_shape, key_shape = ctx.settings
    dq, dk, dv, d_mask = flash_sfa_backward_op(
        grad_out, query, key, value, out, lse, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        dropout_seed, ctx.mask_grad, query_shape, key_shape,
    )
    return dq, dk, dv, None, (d_mask if ctx.mask_grad else None), None, None, None, None, None


flash_sfa_op.register_autograd(_backward, setup_context=_setup_context)


_LIBRARY = torch.library.Library("sfa", "FRAGMENT")


def _inference_op(name: str, mutates_args: tuple[str, ...], reference, cuda, fake):
    """Define ``sfa::<name>`` (schema from ``reference``'s annotations) with torch.library's define / impl /
    register_fake and return its overload. ``reference`` runs on every device, ``cuda`` on CUDA tensors, ``fake``
    gives shapes. Why not ``torch.library.custom_op``: in eager mode it dispatches through Python autograd and
    ADInplaceOrView layers (the latter re-reads the schema's argument list for every argument of a mutating op;
    torch 2.11-2.13), which a decode step would pay in every layer. Inference only, like
    flash-attn's ``flash_attn_with_kvcache``: the Autograd key falls through and both implementations run without
    grad, so outputs never carry a gradient on any device; the CUDA kernels bump the version counters of what they
    write, as autograd expects of in-place ops."""
    _LIBRARY.define(name + torch.library.infer_schema(reference, mutates_args=mutates_args))
    _LIBRARY.impl(name, torch.no_grad()(reference), "CompositeExplicitAutograd")
    _LIBRARY.impl(name, torch.no_grad()(cuda), "CUDA")
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"sfa::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.sfa, name).default


def _flash_sfa_decode_reference(
    query: torch.Tensor,
    key_values: torch.Tensor,
    key_indices: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    topk: int,
    scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
    projection: Optional[torch.Tensor] = None,
    value_scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of a few new query tokens over a compressed key cache (kv_cache.py layout); inference only.
    ``projection``: R (key heads, d, d) applied to the queries before their top-k (the cached keys were
    projected by the same R when appended), fused into the kernel. ``value_scales`` (B, Hk, S) float32: the
    cached values are FP8 (e4m3fn), each row times its scale."""
    check_decode_args(query, key_values, key_indices, value, lengths, topk, attn_mask, projection, value_scales)
    return flash_sfa_decode_reference(query, key_values, key_indices, value, lengths, topk, scale, attn_mask,
                                      projection, value_scales)


def _triton_decode_fits(query: torch.Tensor) -> bool:
    """The Triton decode kernels take these queries (else the reference runs): <= 16 tokens, head dim <= 256,
    half or single precision."""
    return query.size(2) <= MAX_QUERY_LENGTH and query.size(3) <= MAX_HEAD_DIM and query.dtype in KERNEL_DTYPES


def _flash_sfa_decode_cuda(query, key_values, key_indices, value, lengths, topk, scale=None, attn_mask=None,
                           projection=None, value_scales=None):
    check_decode_args(query, key_values, key_indices, value, lengths, topk, attn_mask, projection, value_scales)
    from . import triton_decode

    if not _triton_decode_fits(query):
        return flash_sfa_decode_reference(query, key_values, key_indices, value, lengths, topk, scale, attn_mask,
                                          projection, value_scales)
    return triton_decode.decode(query, key_values, key_indices, value, lengths, topk,
                                default_scale(query, scale), attn_mask, projection, value_scales=value_scales)


def _flash_sfa_decode_fake(query, key_values, key_indices, value, lengths, topk, scale=None, attn_mask=None,
                           projection=None, value_scales=None):
    check_decode_args(query, key_values, key_indices, value, lengths, topk, attn_mask, projection, value_scales)
    return query.new_empty(query.shape)


flash_sfa_decode_op = _inference_op("flash_sfa_decode", (), _flash_sfa_decode_reference, _flash_sfa_decode_cuda,
                                    _flash_sfa_decode_fake)


def _compressed_cache_append_reference(
    key_values: torch.Tensor,
    key_indices: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    counts: Optional[torch.Tensor] = None,
    projection: Optional[torch.Tensor] = None,
    value_scales: Optional[torch.Tensor] = None,
) -> None:
    """Append (B, Hk, T, d) keys (projected by ``projection`` R (Hk, d, d) when given, then compressed to top-k
    here) and values to a compressed cache (kv_cache.py layout) at each sequence's device length, then advance
    ``lengths`` by T (or ``counts[b]``). FP8 cached values (``value_scales`` given) are quantized here, each row
    with its own scale. Device state only, so a decode step that appends stays traceable and replayable; tokens
    past the capacity are dropped (callers that know the host lengths check the capacity first)."""
    check_append_args(key_values, key_indices, values, lengths, new_keys, new_values, counts, projection,
                      value_scales)
    append_reference(key_values, key_indices, values, lengths, new_keys, new_values, counts, projection,
                     value_scales)


def _compressed_cache_append_cuda(key_values, key_indices, values, lengths, new_keys, new_values, counts=None,
                                  projection=None, value_scales=None):
    check_append_args(key_values, key_indices, values, lengths, new_keys, new_values, counts, projection,
                      value_scales)
    if new_keys.dtype not in KERNEL_DTYPES:
        return append_reference(key_values, key_indices, values, lengths, new_keys, new_values, counts, projection,
                                value_scales)
    from . import triton_decode

    triton_decode.append_compressed(key_values, key_indices, values, lengths, new_keys, new_values, counts,
                                    projection, value_scales)
    torch.autograd.graph.increment_version(_written(key_values, key_indices, values, value_scales))
    advance_lengths(lengths, new_keys.size(2), counts, values.size(2))


def _written(*tensors: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The cache buffers a kernel wrote (value_scales only with FP8 values)."""
    return tuple(t for t in tensors if t is not None)


def _compressed_cache_append_fake(key_values, key_indices, values, lengths, new_keys, new_values, counts=None,
                                  projection=None, value_scales=None):
    check_append_args(key_values, key_indices, values, lengths, new_keys, new_values, counts, projection,
                      value_scales)


compressed_cache_append_op = _inference_op(
    "compressed_cache_append", ("key_values", "key_indices", "values", "lengths", "value_scales"),
    _compressed_cache_append_reference, _compressed_cache_append_cuda, _compressed_cache_append_fake)


def _flash_sfa_decode_step_reference(
    query: torch.Tensor,
    key_values: torch.Tensor,
    key_indices: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    topk: int,
    scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
    projection: Optional[torch.Tensor] = None,
    value_scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One decode step: ``sfa::compressed_cache_append`` of the step's (B, Hk, T, d) keys and values, then
    ``sfa::flash_sfa_decode`` of its queries over the cache (the new tokens included). On CUDA, with <= 16 new
    tokens and queries, both run in the decode kernels' own launches (two per step without R, three with)."""
    check_step_args(query, key_values, key_indices, value, lengths, new_keys, new_values, topk, attn_mask, projection,
                    value_scales)
    append_reference(key_values, key_indices, value, lengths, new_keys, new_values, None, projection, value_scales)
    return flash_sfa_decode_reference(query, key_values, key_indices, value, lengths, topk, scale, attn_mask,
                                      projection, value_scales)


def _flash_sfa_decode_step_cuda(query, key_values, key_indices, value, lengths, new_keys, new_values, topk,
                                scale=None, attn_mask=None, projection=None, value_scales=None):
    check_step_args(query, key_values, key_indices, value, lengths, new_keys, new_values, topk, attn_mask, projection,
                    value_scales)
    if not (_triton_decode_fits(query) and new_keys.size(2) <= MAX_QUERY_LENGTH and new_keys.dtype == query.dtype):
        _compressed_cache_append_cuda(key_values, key_indices, value, lengths, new_keys, new_values, None, projection,
                                      value_scales)
        return _flash_sfa_decode_cuda(query, key_values, key_indices, value, lengths, topk, scale, attn_mask,
                                      projection, value_scales)
    from . import triton_decode

    out = triton_decode.decode(query, key_values, key_indices, value, lengths, topk, default_scale(query, scale),
                               attn_mask, projection, new_keys, new_values, value_scales)
    torch.autograd.graph.increment_version(_written(key_values, key_indices, value, lengths, value_scales))
    return out


def _flash_sfa_decode_step_fake(query, key_values, key_indices, value, lengths, new_keys, new_values, topk,
                                scale=None, attn_mask=None, projection=None, value_scales=None):
    check_step_args(query, key_values, key_indices, value, lengths, new_keys, new_values, topk, attn_mask, projection,
                    value_scales)
    return query.new_empty(query.shape)


flash_sfa_decode_step_op = _inference_op(
    "flash_sfa_decode_step", ("key_values", "key_indices", "value", "lengths", "value_scales"),
    _flash_sfa_decode_step_reference, _flash_sfa_decode_step_cuda, _flash_sfa_decode_step_fake)
