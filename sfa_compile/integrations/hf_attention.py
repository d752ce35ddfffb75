"""The "sfa" Hugging Face attention implementation: ``attn_implementation="sfa"``.

Registered through transformers' public extension points, the attention function together with the mask
function (without a registered mask function transformers silently drops masks). A layer carrying an
``SFAProjection`` as ``module.sfa`` runs FlashSFA on its projected queries and keys; any other layer runs
dense SDPA, so one model can mix both. The function receives q and k after RoPE, which is exactly where the
learned projection belongs. With an ``SFACache`` (hf_cache.py), new tokens after the prompt are appended to the
compressed key cache and decode over it, in one op.

Every call is reported to the observers (observers.py): conversion, calibration and Eq. 8 fine-tuning use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import flash_sfa_decode
from ..training.observers import notify
from ..training.straight_through import sfa_attention, straight_through_on

ATTN_IMPLEMENTATION = "sfa"
CACHE_LAYER_KWARG = "sfa_cache_layer"  # SFACache.update hands its layer to this function under this keyword
CACHE_TAG = "_sfa_cache_layer"  # ... or, where the model keeps its attention kwargs from the cache, on the keys


def sfa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                          sfa_cache_layer=None, **kwargs):
    """Same contract as transformers' sdpa_attention_forward: (batch, heads, len, d) in, (batch, len, heads,
    d) out, no attention weights. ``sfa_cache_layer``: the SFACache layer that took this call's keys."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    sdpa_kwargs = dict(attn_mask=attention_mask, is_causal=is_causal, scale=scaling,
                       dropout_p=dropout if module.training else 0.0, enable_gqa=key.shape[1] != query.shape[1])
    sfa = getattr(module, "sfa", None)
    cache_layer = sfa_cache_layer if sfa_cache_layer is not None else getattr(key, CACHE_TAG, None)
    if sfa is not None and cache_layer is not None and cache_layer.decoding:
        return _decode(cache_layer, query, key, value, attention_mask, scaling)
    if attention_mask is not None and attention_mask.size(-1) > key.size(-2) and cache_layer is not None:
        # A prompt's mask over a static SFACache's capacity (a 4-D mask the caller built for a static cache; the
        # masks transformers builds are sized by the cache's get_mask_sizes): the keys are the cache's first tokens.
        sdpa_kwargs["attn_mask"] = attention_mask = attention_mask[..., :key.size(-2)]
    if sfa is None:
        out = F.scaled_dot_product_attention(query, key, value, **sdpa_kwargs)
    else:
        query, key = sfa.project(query), sfa.project(key)
        out = sfa_attention(query, key, value, topk=sfa.topk, straight_through=straight_through_on(module),
                            **sdpa_kwargs)
    notify(module, query, key, value, attention_mask, out, sdpa_kwargs)
    return out.transpose(1, 2).contiguous(), None


def _decode(cache_layer, query, key, value, attention_mask, scaling):
    """New tokens of a generation with an SFACache: append their keys and values to the compressed cache and
    attend over it (observers are not called: no dense keys of the past exist here)."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError("SFACache decoding needs a boolean attention mask (the 'sfa' mask function gives one); "
                         f"got {attention_mask.dtype}")
    with torch.no_grad():  # inference only: the op mutates the cache and has no gradient
        out = flash_sfa_decode(query, cache_layer.store, scale=scaling, attn_mask=attention_mask,
                               projection=cache_layer.projection_weight(), new_keys=key, new_values=value)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register the "sfa" attention function and its mask function with transformers."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, sfa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
