"""``SFACache``: a Hugging Face ``Cache`` that stores the keys of SFA layers compressed.

    model = sfa_compile.load("out/")      # or any model converted with attn_implementation="sfa"
    out = model.generate(**inputs, past_key_values=SFACache(model), max_new_tokens=128)  # 5.24+: cache=

Each SFA layer's keys are projected by the layer's R (inside the append kernel), compressed to top-k values +
indices and appended to a ``CompressedKVCache``; values stay dense; other layers keep a plain dense cache.
``update`` hands the attention function its cache layer: as the keyword ``sfa_cache_layer`` where the model
passes its attention kwargs through ``Cache.update`` (transformers 5.24+: Llama, Qwen, Mistral, ...), otherwise
as an attribute of the keys it returns (older transformers). The first call (the prompt) is appended there and
runs the prefill kernel on its own keys; later calls (decode steps) leave the appending to the attention
function, which appends and attends over the compressed cache in one op (``flash_sfa_decode`` with
``new_keys``: the append rides in the decode kernels' launches). Only the "sfa" attention function knows the
handoff, so the cache refuses models that do not use it, and a growing cache checks at each step that the
previous one reached it.

With ``max_cache_len`` the cache is static, like transformers' StaticCache: every layer allocates its capacity up
front and never moves, attention masks span the capacity, and a decode step reads only device state (lengths
on the device), so the whole step can be captured in a CUDA graph and replayed (benchmarks/bench_generate.py),
or compiled: under ``torch.compile`` a step appends and attends through the ``sfa::flash_sfa_decode_step`` op
without touching host lengths (no recompilation per token), reports its length as a device tensor as
StaticLayer does (up to 16 new tokens per compiled call; run the prompt uncompiled).

With ``value_dtype=torch.float8_e4m3fn`` the SFA layers cache their values in FP8 with a float32 scale per token and
key head (quantized as appended, dequantized inside the decode kernels): about 0.30 of a bf16 cache at head dim 128,
topk 8, against 0.55 with model-dtype values. The prompt's own attention runs on its unquantized values.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer

from ..kernels.kv_cache import CompressedKVCache, check_value_dtype
from ..kernels.limits import MAX_QUERY_LENGTH
from .hf_attention import ATTN_IMPLEMENTATION, CACHE_LAYER_KWARG, CACHE_TAG


def _is_identity(r: torch.Tensor) -> bool:
    """Every key head's R is exactly the identity (reads the device once, when a cache layer is created)."""
    return torch.equal(r, torch.eye(r.size(-1), dtype=r.dtype, device=r.device).expand_as(r))


class SFACacheLayer(CacheLayerMixin):
    """One SFA attention layer: compressed keys (after the layer's projection) and dense values."""

    is_sliding = False
    is_croppable = True

    def __init__(self, projection, max_cache_len: int | None = None, value_dtype: torch.dtype | None = None):
        super().__init__()
        self.projection, self.max_cache_len, self.value_dtype = projection, max_cache_len, value_dtype
        self.is_compileable = max_cache_len is not None
        self.store: CompressedKVCache | None = None
        self.identity_projection = False  # R is exactly the identity: the kernels skip it
        self.decoding = False  # the latest update is a decode step: the attention function appends its tokens
        self.expected_length: int | None = None  # a growing cache's length once that step has been appended

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, key_heads, length, head_dim = key_states.shape
        self.dtype, self.device = value_states.dtype, value_states.device
        static = self.max_cache_len is not None
        self.store = CompressedKVCache(batch, key_heads, head_dim, self.projection.topk, value_states.dtype,
                                       value_states.device, capacity=self.max_cache_len if static else length + 256,
                                       fixed=static, value_dtype=self.value_dtype)
        # An identity R (a conversion without calibration: plain top-k) is skipped, x @ I being x exactly: it would
        # only cost the decode step a projection kernel. Checked once per cache (it reads the device).
        weight = self.projection.weight
        self.identity_projection = (weight is not None and not torch.compiler.is_compiling()
                                    and _is_identity(weight.detach()))
        if static and not torch.compiler.is_compiling():
            # Fixed addresses: cudagraph-replaying compiled code ("reduce-overhead") must not copy the cache.
            store = self.store
            for t in (*store.buffers, store.lengths):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def projection_weight(self) -> torch.Tensor | None:
        """R of the cached keys for the kernels, read from the layer's projection (its one source) in the cache's
        dtype (the module's own tensor when the dtypes match); None when there is none or it is the identity.
        Called once per layer and step, under no_grad (the cache's ops are inference-only)."""
        weight = self.projection.weight
        if weight is None or self.identity_projection:
            return None
        return weight.to(self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.compiler.is_compiling():  # host lengths are not read in compiled code: they would specialize it
            if self.max_cache_len is None:
                raise ValueError("SFACache under torch.compile needs a static cache: SFACache(model, max_cache_len=N)")
            if key_states.size(2) > MAX_QUERY_LENGTH:
                raise ValueError(f"SFACache: a compiled step got {key_states.size(2)} new tokens; compiled steps "
                                 f"attend over the compressed cache with at most {MAX_QUERY_LENGTH}. Run the prompt "
                                 "uncompiled "
                                 "(transformers' generate does) or feed it in chunks of at most 16 tokens")
            self.decoding = True
        else:
            self._check_previous_step()
            self.decoding = self.store.max_length > 0
            if self.decoding and self.max_cache_len is None:
                self.expected_length = self.store.max_length + key_states.size(2)
        if not self.decoding:
            with torch.no_grad():
                self.store.append(key_states, value_states, projection=self.projection_weight())
        attention_kwargs = kwargs.get("kwargs")
        if isinstance(attention_kwargs, dict):  # the dict the model then unpacks into the attention function
            attention_kwargs[CACHE_LAYER_KWARG] = self
        else:
            setattr(key_states, CACHE_TAG, self)
        return key_states, value_states

    def _check_previous_step(self) -> None:
        """A decode step's tokens are appended by the attention function: if the handoff was lost (a model that
        copies its keys between the cache and the attention function), they never were; fail rather than decode
        over a cache with holes."""
        expected, self.expected_length = self.expected_length, None
        if expected is not None and self.store.max_length != expected:
            raise RuntimeError("SFACache: the previous step's keys never reached the 'sfa' attention function (the "
                               "model changed them between its cache and its attention call); generate with a "
                               "dense cache (no SFACache) for this model")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(key length, offset) of the masks transformers builds for the next call. The prompt into an empty cache
        attends to its own keys only, static or not: a mask over them alone, which transformers drops for an unpadded
        causal prompt (the fast no-mask engines then run); decode steps of a static cache mask every slot. Older
        transformers pass the call's cache positions instead of their count."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        if self.max_cache_len is None:
            return self.get_seq_length() + query_length, 0
        if torch.compiler.is_compiling() or self._holds_tokens():
            return self.max_cache_len, 0
        return query_length, 0

    def _holds_tokens(self) -> bool:
        return self.is_initialized and self.store.max_length > 0

    def get_seq_length(self) -> int | torch.Tensor:
        if not self.is_initialized:
            return 0
        if self.max_cache_len is not None:
            return self.store.lengths.max()  # a device tensor, as StaticLayer: no host sync, no recompilation
        return self.store.max_length

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    @property
    def nbytes(self) -> int:
        return self.store.nbytes if self.is_initialized else 0

    def reset(self) -> None:
        self.store, self.is_initialized, self.decoding, self.expected_length = None, False, False, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.store.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.store.select(torch.arange(self.store.batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention: rejected speculative drafts); a
        positive value is the length to keep, the convention transformers 5.17 still accepts (deprecated)."""
        if not self.is_initialized:
            return
        self._check_previous_step()
        if tokens_to_remove:
            length = self.store.max_length
            keep = max(length + tokens_to_remove, 0) if tokens_to_remove < 0 else min(tokens_to_remove, length)
            self.store.crop(keep)


class SFACache(Cache):
    """Cache for ``model.generate`` on an SFA model: compressed keys in SFA layers, dense elsewhere; static (fixed
    buffers, CUDA-graph friendly) with ``max_cache_len``; FP8 values in SFA layers with
    ``value_dtype=torch.float8_e4m3fn``."""

    def __init__(self, model, max_cache_len: int | None = None, value_dtype: torch.dtype | None = None):
        if getattr(getattr(model, "config", None), "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError("SFACache needs a model that runs attn_implementation='sfa' (convert it with "
                             "sfa_compile.convert or load it with sfa_compile.load)")
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"SFACache serves decoder-only models; {type(model).__name__} is an encoder-decoder "
                             "model: generate without past_key_values (transformers' own cache, SFA attention)")
        projections = {m.layer_idx: m.sfa for m in model.modules()
                       if getattr(m, "sfa", None) is not None and getattr(m, "layer_idx", None) is not None}
        if not projections:
            raise ValueError("SFACache: the model has no SFA attention layer with a layer_idx; nothing to compress")
        n_layers = model.config.get_text_config().num_hidden_layers
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"SFACache: max_cache_len must be a positive integer, got {max_cache_len!r}")
        if check_value_dtype(value_dtype, model.dtype, "SFACache") == model.dtype:
            value_dtype = None  # the dtype of the values as they come (the model's, or autocast's)
        dense = (lambda: DynamicLayer()) if max_cache_len is None else (lambda: StaticLayer(max_cache_len))
        super().__init__(layers=[SFACacheLayer(projections[i], max_cache_len, value_dtype) if i in projections
                                 else dense() for i in range(n_layers)])

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens: compressed layers plus any dense ones."""
        return sum(layer.nbytes if isinstance(layer, SFACacheLayer)
                   else sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                   for layer in self.layers)
