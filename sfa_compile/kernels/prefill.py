"""``sfa::flash_sfa`` and its backward on the fastest engine for the call: top-k of q and k, then dense attention.

SFA's scores are exactly dense attention on the sparsified q~ and k~ (zeros at the dropped features), so after one
top-k pass any exact dense attention engine computes SFA, and the gradients of q and k are the engine's, masked
to the kept features. Which engine runs a call is a pure function of the call's metadata (device, dtypes, shapes,
mask, flags), so the backward always runs the engine its forward ran. The rules (measured on the H100:
benchmarks/RESULTS.md, the prefill table; LOG.md):

| device | the call                                                                    | engine               |
|--------|-----------------------------------------------------------------------------|----------------------|
| CUDA   | fp16/bf16, no mask, causal only with L == S, equal head dims, key heads ==  | SDPA cuDNN           |
|        | query heads, and SDPA's cuDNN backend takes it                              |                      |
| CUDA   | as above where cuDNN does not take it and SDPA's flash backend does         | SDPA flash           |
| CUDA   | any other fp16/bf16/fp32 call with head dims <= 256 (masks, L != S causal,  | our Triton kernels   |
|        | GQA: no K/V repeats)                                                        |                      |
| CPU    | fp16/bf16/fp32, equal head dims, mask boolean or of the query's dtype       | SDPA's CPU flash     |
| any    | float64, dropout, gradients of the mask, other devices                      | pure-PyTorch         |
|        |                                                                             | reference            |

SDPA's backends are reached through their aten ops (forward with log-sum-exp, backward with the forward's outputs),
the calls SDPA's own autograd makes, and only where SDPA's public ``can_use_*`` checks accept the arguments (they
also honour ``torch.backends.cuda.enable_*_sdp``). The op's ``lse`` output is what the engine's backward needs: the
float32 log-sum-exp of each query row. The reference fallback warns once per reason; empty inputs take the
reference silently.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .checks import default_scale, gqa_group_size, score_shape
from .limits import HALF_DTYPES, KERNEL_DTYPES, MAX_HEAD_DIM
from .reference import flash_sfa_backward_reference, flash_sfa_reference
from .topk import kept_features, sparsify_dense, sparsify_fast

REFERENCE, TRITON, CUDNN, FLASH, CPU_FLASH = "reference", "triton", "sdpa_cudnn", "sdpa_flash", "sdpa_cpu_flash"
_warned: set = set()


def _reference_reason(query, key, value, dropout_p: float, mask_grad: bool) -> Optional[str]:
    """Why no fast engine can run these arguments, or None when one can."""
    if query.dtype not in KERNEL_DTYPES:
        return f"{query.dtype} inputs (the fast engines take float16, bfloat16 and float32)"
    if dropout_p > 0.0:
        return "dropout_p > 0 (the fast engines run no dropout)"
    if mask_grad:
        return "gradients with respect to attn_mask"
    if query.device.type == "cuda" and max(query.size(-1), value.size(-1)) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM}"
    if query.device.type not in ("cuda", "cpu"):
        return f"{query.device.type} tensors"
    return None


def _sdpa_backend(q, k, v, is_causal: bool) -> str:
    """SDPA cuDNN or flash for 4-D half-precision q~, k~, v without a mask, or TRITON when neither takes them."""
    length, keys = q.size(-2), k.size(-2)
    if q.dtype not in HALF_DTYPES or (is_causal and length != keys) or q.size(-1) != v.size(-1):
        return TRITON
    if 0 in q.stride() + k.stride() + v.stride():  # broadcast batch or heads: the Triton kernels read stride 0
        return TRITON
    if q.size(1) != k.size(1):  # GQA: our kernels run it faster than SDPA's flash backend (LOG.md, 2026-12-07)
        return TRITON
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, is_causal, False)
    if torch.backends.cuda.can_use_cudnn_attention(params, False):
        return CUDNN
    if torch.backends.cuda.can_use_flash_attention(params, False):
        return FLASH
    return TRITON


def _engine(q, k, v, mask, is_causal: bool) -> str:
    """The engine for 4-D q~, k~, v and an optional 4-D mask, already past ``_reference_reason``."""
    if q.device.type == "cpu":
        takes = q.size(-1) == v.size(-1) and (mask is None or mask.dtype in (torch.bool, q.dtype))
        return CPU_FLASH if takes else REFERENCE
    return TRITON if mask is not None else _sdpa_backend(q, k, v, is_causal)


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"sfa::flash_sfa: {reason} runs on the pure-PyTorch reference (same result, slower, "
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


def _sparsify(x: torch.Tensor, topk: int, triton: bool) -> torch.Tensor:
    """x~ of the 4-D ``x``: the Triton top-k (CUDA, or Triton's interpreter under tests), else the CPU selection,
    else (other devices' float64) the sort."""
    if triton and x.dtype in KERNEL_DTYPES:
        from .triton_topk import sparsify_triton

        return sparsify_triton(x, topk)
    return sparsify_fast(x, topk) if x.device.type == "cpu" else sparsify_dense(x, topk)[0]


def _zero_dropped(grad: torch.Tensor, x_sparse: torch.Tensor, topk: int, triton: bool) -> torch.Tensor:
    """The gradient of x~ as the gradient of x: zero at the features x~'s top-k dropped (read from x~ itself), in
    place on ``grad`` (the engine's own dq~ or dk~)."""
    if triton and x_sparse.dtype in KERNEL_DTYPES:
        from .triton_topk import zero_dropped_triton

        return zero_dropped_triton(grad, x_sparse, topk)
    return grad.masked_fill_(kept_features(x_sparse, topk).logical_not_(), 0)


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = attend) as an additive one of ``dtype`` (0 / -inf), as SDPA's CPU flash kernel takes
    masks; other masks unchanged."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _no_rng(device) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device=device)


def _engine_forward(engine, q, k, v, mask, is_causal, scale):
    """(out, lse (B, H, L) float32) of dense attention on 4-D q~, k~, v."""
    aten = torch.ops.aten
    if engine == CPU_FLASH:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                                    attn_mask=additive_mask(mask, q.dtype), scale=scale)
        # Its online softmax skips NaN scores; SFA's contract (SDPA's math backend) propagates a query's NaN.
        if not q.sum(-1).isnan().any():  # a row sum is NaN whenever the row holds one: one cheap pass first
            return out, lse
        return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan")), lse
    if engine == CUDNN:
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False,
                                                            scale=scale)[:2]
        return out, lse.reshape(q.shape[:3])
    if engine == FLASH:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
        return out, lse
    from .triton_prefill import flash_forward

    return flash_forward(q, k, v, mask, is_causal, scale)


def _engine_backward(engine, d_out, q, k, v, out, lse, mask, is_causal, scale):
    """(dq~, dk~, dv) of ``_engine_forward`` from its saved output and log-sum-exp."""
    aten = torch.ops.aten
    length, keys = q.size(-2), k.size(-2)
    if engine == CPU_FLASH:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=additive_mask(mask, q.dtype), scale=scale)
    if engine == CUDNN:
        # Heads folded into the batch, (batch x heads, 1, length, d): PyTorch caches cuDNN graphs per shape and
        # q, k, v layout, and sharing them with SDPA's own autograd (other output-gradient layouts) corrupted
        # gradients (benchmarks/LOG.md); each head's attention is unchanged.
        rng = _no_rng(q.device)
        d_out, q1, k1, v1, out = (t.reshape(-1, 1, *t.shape[-2:]) for t in (d_out, q, k, v, out))
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            d_out, q1, k1, v1, out, lse.reshape(-1, 1, length, 1), rng, rng, None, None, None, length, keys, 0.0,
            is_causal, scale=scale)[:3]
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    if engine == FLASH:
        rng = _no_rng(q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            d_out, q, k, v, out, lse, None, None, length, keys, 0.0, is_causal, rng, rng, scale=scale)
    from .triton_prefill_backward import flash_backward

    return flash_backward(d_out, q, k, v, out, lse, mask, is_causal, scale)


def _inputs(query, key, value, topk, attn_mask, enable_gqa, triton, sparse: bool = False):
    """The op's arguments in the engines' 4-D layout, q and k sparsified (by the Triton top-k if ``triton``) unless
    they already are (``sparse``, or topk >= d): (batch, kv batch, q~, k~, v, mask)."""
    batch, kv_batch = _layout(query, key, value, enable_gqa)
    q, k = _four_d(query, batch), _four_d(key, kv_batch)
    if not sparse and topk < query.size(-1):
        q, k = _sparsify(q, topk, triton), _sparsify(k, topk, triton)
    mask = None if attn_mask is None else _four_d(attn_mask, batch, query.size(-2), key.size(-2))
    return batch, kv_batch, q, k, _four_d(value, kv_batch), mask


def engine_for(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False,
               mask_grad=False) -> str:
    """The engine ``sfa::flash_sfa`` runs these arguments on (for benchmarks and tests; the op decides the same)."""
    if _reference_reason(query, key, value, dropout_p, mask_grad) is not None or _is_empty(query, key, value):
        return REFERENCE
    batch, kv_batch = _layout(query, key, value, enable_gqa)
    q, k, v = _four_d(query, batch), _four_d(key, kv_batch), _four_d(value, kv_batch)
    mask = None if attn_mask is None else _four_d(attn_mask, batch, query.size(-2), key.size(-2))
    return _engine(q, k, v, mask, is_causal)


def gradient_strides(shape, engine: str) -> Optional[tuple]:
    """The strides of the op's gradient of ``shape`` (the backward's fake declares the same), or None for
    contiguous. SDPA's CPU flash backward writes 4-D gradients heads innermost ((B, N, H, E) in memory, as SDPA's
    own autograd returns them): they are returned as they are, not copied."""
    if engine != CPU_FLASH or len(shape) != 4:
        return None
    _, heads, length, dim = shape
    return (length * heads * dim, dim, heads * dim, 1)


def _in_layout(grad: torch.Tensor, engine: str) -> torch.Tensor:
    """``grad`` with exactly the strides ``gradient_strides`` declares for it: a view when only the strides of size-1
    dims differ, else a copy."""
    strides = gradient_strides(grad.shape, engine)
    if strides is None:
        return grad.contiguous()
    if all(n == 1 or a == b for n, a, b in zip(grad.shape, grad.stride(), strides)):
        return grad if grad.stride() == strides else grad.as_strided(grad.shape, strides)
    return torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device).copy_(grad)


def sparse_shapes(query, key, value, topk, enable_gqa) -> tuple[list, list]:
    """Shapes of the op's q~ and k~ outputs: the scores' batch dims (K's own head count under GQA) + (length, d),
    or (0,) when topk >= d (nothing is dropped: the backward reads q and k themselves)."""
    if topk >= query.size(-1):
        return [0], [0]
    batch, kv_batch = _layout(query, key, value, enable_gqa)
    return batch + list(query.shape[-2:]), kv_batch + list(key.shape[-2:])


def forward(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_seed,
            engine: Optional[str] = None):
    """(out, lse, q~, k~) of ``sfa::flash_sfa`` (arguments already validated; q~, k~ shaped by ``sparse_shapes``,
    what the backward reads instead of a second top-k). ``engine``: run this one instead of the rules' choice
    (tests run the Triton kernels on the CPU through Triton's interpreter this way)."""
    reason = _reference_reason(query, key, value, dropout_p, False)
    if reason is not None or _is_empty(query, key, value):
        engine = REFERENCE
    triton = (query.is_cuda and engine != REFERENCE) or engine == TRITON  # the reference's q~, k~ come from the sort
    batch, kv_batch, q, k, v, mask = _inputs(query, key, value, topk, attn_mask, enable_gqa, triton)
    engine = engine or _engine(q, k, v, mask, is_causal)
    if engine == REFERENCE:
        if reason is not None:
            _warn_once(reason)
        out, lse = flash_sfa_reference(query, key, value, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       dropout_seed)
    else:
        out, lse = _engine_forward(engine, q, k, v, mask, is_causal, default_scale(query, scale))
        out = out.reshape(*batch, query.size(-2), value.size(-1)).contiguous()
        lse = lse.reshape(*batch, query.size(-2)).contiguous()
    if topk >= query.size(-1):
        return out, lse, query.new_empty(0), key.new_empty(0)
    return (out, lse, q.reshape(*batch, *query.shape[-2:]).contiguous(),
            k.reshape(*kv_batch, *key.shape[-2:]).contiguous())


def backward(grad_out, query, key, value, out, lse, topk, attn_mask, dropout_p, is_causal, scale, enable_gqa,
             dropout_seed, mask_grad, query_shape, key_shape, engine: Optional[str] = None):
    """(dq, dk, dv, d_mask or None) of ``sfa::flash_sfa``, gradients only through kept features and in the layout
    ``gradient_strides`` declares for the engine. ``query`` and
    ``key`` are the forward's q~ and k~ (q and k when topk >= d); ``query_shape``, ``key_shape`` the shapes of q
    and k; ``engine`` as in ``forward`` (it must be the forward's). The keep masks are read from q~ and k~
    (``topk.kept_features``); the reference sparsifies them again, which keeps the same features."""
    reason = _reference_reason(query, key, value, dropout_p, mask_grad)
    if reason is not None or _is_empty(query, key, value):
        engine = REFERENCE
    triton = query.is_cuda or engine == TRITON
    batch, kv_batch, q, k, v, mask = _inputs(query, key, value, topk, attn_mask, enable_gqa, triton, sparse=True)
    engine = engine or _engine(q, k, v, mask, is_causal)
    if engine == REFERENCE:
        if reason is not None:
            _warn_once(reason)
        dq, dk, dv, d_mask = flash_sfa_backward_reference(grad_out, query, key, value, topk, attn_mask, dropout_p,
                                                          is_causal, scale, enable_gqa, dropout_seed, mask_grad)
        return (_in_layout(dq.sum_to_size(query_shape), engine), _in_layout(dk.sum_to_size(key_shape), engine),
                _in_layout(dv, engine), d_mask)
    lse4 = _four_d(lse.unsqueeze(-1), batch).squeeze(-1).contiguous()
    out4 = _four_d(out, batch).contiguous()
    d_out4 = _four_d(grad_out, batch).contiguous()
    dq, dk, dv = _engine_backward(engine, d_out4, q, k, v, out4, lse4, mask, is_causal, default_scale(query, scale))
    if topk < query.size(-1):
        dq, dk = _zero_dropped(dq, q, topk, triton), _zero_dropped(dk, k, topk, triton)
    length, keys = query.size(-2), key.size(-2)
    # One at a time: a strided original is freed as soon as its copy exists.
    dq = _in_layout(dq.reshape(*batch, length, query.size(-1)).sum_to_size(query_shape), engine)
    dk = _in_layout(dk.reshape(*kv_batch, keys, key.size(-1)).sum_to_size(key_shape), engine)
    dv = _in_layout(dv.reshape(*kv_batch, keys, value.size(-1)).sum_to_size(value.shape), engine)
    return dq, dk, dv, None
