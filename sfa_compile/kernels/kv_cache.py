"""The compressed KV cache of one attention layer: keys as top-k values + indices, values dense.

Per sequence b, key head h and cached token s: ``key_values[b, h, s]`` holds the ``topk`` kept key features in
the model dtype and ``key_indices[b, h, s]`` their feature indices (uint8, int16 when the head dim exceeds
256), ascending; ``values[b, h, s]`` is the dense value row, in the model dtype or, with ``value_dtype=
torch.float8_e4m3fn``, in FP8 with a float32 scale per row in ``value_scales[b, h, s]`` (quantized as appended,
dequantized inside the decode kernels). Sequences have their own lengths (``lengths``,
int32 on the cache's device, mirrored on the host so appends and sizes never synchronize). The cache owns the
write protocol (make room, run the op over its buffers, then update the host lengths): ``append`` writes through
``sfa::compressed_cache_append``, ``step`` appends and attends through ``sfa::flash_sfa_decode_step``, ``attend``
reads through ``sfa::flash_sfa_decode``; the ops read and advance the device lengths. Buffers grow by a quarter
(at least 256 tokens) when full, unless the capacity is ``fixed``: then the buffers never move and ``views`` is the
whole capacity (slots past a sequence's length are ignored by the decode kernel), so a decode step depends on
device state only and can be replayed from a CUDA graph or compiled (``append_on_device`` and ``step(...,
on_device=True)`` skip the host mirror, which is re-read from the device when next needed). Bytes per token and
key head: topk*(s_val + s_idx) + d*s_val against 2*d*s_val dense (DESIGN.md section 1), with FP8 values
topk*(s_val + s_idx) + d + 4; ``nbytes`` counts the cached tokens, ``capacity_nbytes`` the allocation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops
from .cache_reference import dense_cache
from .checks import check_topk
from .compressed import index_dtype
from .limits import FP8_VALUE_DTYPE


class CompressedKVCache:
    """Growable compressed cache for (batch, key heads, tokens, head dim) keys and values."""

    def __init__(self, batch: int, key_heads: int, head_dim: int, topk: int, dtype: torch.dtype,
                 device=None, capacity: int = 256, fixed: bool = False, value_dtype: Optional[torch.dtype] = None):
        check_topk(topk, head_dim, "CompressedKVCache")
        self.batch, self.key_heads, self.head_dim, self.topk = batch, key_heads, head_dim, topk
        self.fixed = fixed
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self.value_dtype = check_value_dtype(value_dtype, dtype, "CompressedKVCache")
        self.value_scales: Optional[torch.Tensor] = None  # (batch, key heads, slots) float32 with FP8 values
        self._host_lengths: Optional[list[int]] = [0] * batch  # None: only the device lengths are current
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._allocate(max(capacity, 1))

    def _allocate(self, capacity: int) -> None:
        shape = (self.batch, self.key_heads, capacity)
        new = dict(key_values=torch.empty(*shape, self.topk, dtype=self.dtype, device=self.device),
                   key_indices=torch.empty(*shape, self.topk, dtype=index_dtype(self.head_dim), device=self.device),
                   values=torch.empty(*shape, self.head_dim, dtype=self.value_dtype, device=self.device))
        if self.fp8_values:
            new["value_scales"] = torch.empty(*shape, dtype=torch.float32, device=self.device)
        used = self.max_length if hasattr(self, "values") else 0
        for name, buffer in new.items():
            if used:
                buffer[:, :, :used] = getattr(self, name)[:, :, :used]
            setattr(self, name, buffer)

    @property
    def host_lengths(self) -> list[int]:
        """Per-sequence lengths on the host (read back from the device after ``append_on_device``)."""
        if self._host_lengths is None:
            self._host_lengths = self.lengths.tolist()
        return self._host_lengths

    @host_lengths.setter
    def host_lengths(self, lengths: Optional[list[int]]) -> None:
        """None: only the device lengths are current (re-read when next needed)."""
        self._host_lengths = None if lengths is None else list(lengths)

    @property
    def fp8_values(self) -> bool:
        return self.value_dtype == FP8_VALUE_DTYPE

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the cache with one row per (sequence, key head, slot)."""
        return tuple(getattr(self, name) for name in self._buffer_names())

    def _buffer_names(self) -> tuple[str, ...]:
        return ("key_values", "key_indices", "values") + (("value_scales",) if self.fp8_values else ())

    @property
    def capacity(self) -> int:
        return self.values.size(2)

    @property
    def max_length(self) -> int:
        return max(self.host_lengths)

    @property
    def token_nbytes(self) -> int:
        """Bytes of one cached token of one key head."""
        return (self.topk * (self.key_values.element_size() + self.key_indices.element_size())
                + self.head_dim * self.values.element_size() + (4 if self.fp8_values else 0))

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens (what a decode step reads)."""
        return sum(self.host_lengths) * self.key_heads * self.token_nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same tokens take in a dense cache of the model dtype."""
        return sum(self.host_lengths) * self.key_heads * 2 * self.head_dim * self.key_values.element_size()

    @property
    def capacity_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, counts: Optional[Sequence[int]] = None,
                 on_device: bool = False) -> tuple[Optional[torch.Tensor], Optional[list[int]]]:
        """Check (batch, key heads, T, d) ``keys`` and ``values`` (every sequence gets T tokens, or the first
        ``counts[b]``) against the cache and make room for them, for an sfa op that then writes them and advances
        the device lengths. Returns ``counts`` as the device tensor the ops take (None: uniform) and the host
        lengths after the append, set once the op ran (None ``on_device``: a fixed cache whose host lengths are
        not read, as in a compiled step; tokens past the capacity are dropped)."""
        batch, heads, length, dim = keys.shape
        if (batch, heads, dim) != (self.batch, self.key_heads, self.head_dim) or values.shape != keys.shape:
            raise ValueError(f"CompressedKVCache.append: keys {tuple(keys.shape)} and values {tuple(values.shape)} "
                             f"must both be (batch {self.batch}, key heads {self.key_heads}, tokens, head dim "
                             f"{self.head_dim})")
        if on_device:
            if not self.fixed or counts is not None:
                raise ValueError("CompressedKVCache: appending without host lengths (a compiled step) needs a fixed "
                                 "capacity (the buffers cannot grow) and the same token count for every sequence")
            return None, None
        uniform = counts is None
        counts = [length] * batch if uniform else list(counts)
        if len(counts) != batch or any(not 0 <= c <= length for c in counts):
            raise ValueError(f"CompressedKVCache.append: counts {counts} must give 0..{length} tokens for each of "
                             f"{batch} sequences")
        needed = max(n + c for n, c in zip(self.host_lengths, counts))
        if needed > self.capacity and self.fixed:
            raise ValueError(f"CompressedKVCache.append: {needed} tokens exceed the fixed capacity {self.capacity}; "
                             "create the cache with a larger capacity (SFACache: max_cache_len)")
        if needed > self.capacity:
            self._allocate(max(needed, self.capacity + max(256, self.capacity // 4)))
        after = [n + c for n, c in zip(self.host_lengths, counts)]
        return (None if uniform else torch.tensor(counts, dtype=torch.int32, device=self.device)), after

    def append(self, keys: torch.Tensor, values: torch.Tensor, counts: Optional[Sequence[int]] = None,
               projection: Optional[torch.Tensor] = None) -> None:
        """Append (batch, key heads, T, d) keys and values: every sequence gets T tokens, or only the first
        ``counts[b]`` of them (ragged batches). Keys are projected by ``projection`` R (key heads, d, d) when
        given and compressed here (top-k by magnitude)."""
        self._append(keys, values, counts, projection, on_device=False)

    def append_on_device(self, keys: torch.Tensor, values: torch.Tensor,
                         projection: Optional[torch.Tensor] = None) -> None:
        """Append T tokens to every sequence of a fixed cache touching device state only (no host reads, so a
        compiled decode step never specializes on lengths); the capacity is not checked: tokens past it are
        dropped. The host lengths are re-read from the device when next needed."""
        self._append(keys, values, None, projection, on_device=True)

    def _append(self, keys, values, counts, projection, on_device: bool) -> None:
        counts_t, after = self._reserve(keys, values, counts, on_device)
        ops.compressed_cache_append_op(self.key_values, self.key_indices, self.values, self.lengths, keys, values,
                                       counts_t, projection, self.value_scales)
        self.host_lengths = after  # None on device: re-read when next needed

    def attend(self, query: torch.Tensor, scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
               projection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SFA of the newest ``query`` tokens over the cached keys (``sfa_compile.flash_sfa_decode``)."""
        return ops.flash_sfa_decode_op(query, *self.views(), self.lengths, self.topk, scale, attn_mask, projection,
                                       self.scale_view())

    def step(self, query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
             scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
             projection: Optional[torch.Tensor] = None, on_device: bool = False) -> torch.Tensor:
        """One generation step: append the step's keys and values (as ``append``; ``on_device`` as
        ``append_on_device``) and attend ``query`` over the cache with them, in the decode kernels' own launches."""
        _, after = self._reserve(new_keys, new_values, on_device=on_device)
        length = None if after is None else max(after)  # with the new tokens
        out = ops.flash_sfa_decode_step_op(query, *self.views(length), self.lengths, new_keys, new_values, self.topk,
                                           scale, attn_mask, projection, self.scale_view(length))
        self.host_lengths = after
        return out

    def views(self, length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key values, key indices, values) over the first ``length`` (default ``max_length``) tokens, no copies;
        a fixed cache: all slots."""
        return tuple(self._covered(t, length) for t in (self.key_values, self.key_indices, self.values))

    def scale_view(self, length: Optional[int] = None) -> Optional[torch.Tensor]:
        """The FP8 values' scales over the slots ``views`` covers; None without FP8 values."""
        return self._covered(self.value_scales, length)

    def _covered(self, buffer: Optional[torch.Tensor], length: Optional[int]) -> Optional[torch.Tensor]:
        if buffer is None or self.fixed:  # a fixed cache: the buffers themselves (a compiled step mutates graph
            return buffer  # inputs, not views of them)
        return buffer[:, :, :self.max_length if length is None else length]

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of shape (batch, key heads, max_length (fixed: capacity), d) in the model dtype: the
        SFA-sparsified keys (zeros at dropped features) and the values (FP8 ones dequantized); positions past a
        sequence's length are zero."""
        return dense_cache(*self.views(), self.lengths, self.head_dim, self.scale_view())

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, topk: int, lengths: Optional[Sequence[int]] = None,
                   value_dtype: Optional[torch.dtype] = None) -> "CompressedKVCache":
        """A cache holding dense (batch, key heads, T, d) keys/values, the first ``lengths[b]`` tokens of each."""
        batch, heads, length, dim = keys.shape
        cache = cls(batch, heads, dim, topk, values.dtype, keys.device, capacity=length, value_dtype=value_dtype)
        cache.append(keys, values, lengths)
        return cache

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder) the sequences ``index`` (beam search, finished sequences)."""
        index = index.to(self.device)
        for name in self._buffer_names():
            setattr(self, name, getattr(self, name)[index])
        self.host_lengths = [self.host_lengths[i] for i in index.tolist()]
        self.batch = len(self.host_lengths)
        self.lengths = self.lengths[index]

    def crop(self, length: int) -> None:
        """Forget tokens past ``length`` in every sequence."""
        self.host_lengths = [min(n, length) for n in self.host_lengths]
        self.lengths.clamp_(max=length)


def check_value_dtype(value_dtype: Optional[torch.dtype], dtype: torch.dtype, name: str) -> torch.dtype:
    """The cached values' dtype: the model's (``None`` or ``dtype``) or FP8 (e4m3fn, per-row scales)."""
    if value_dtype is None or value_dtype == dtype:
        return dtype
    if value_dtype == FP8_VALUE_DTYPE:
        return value_dtype
    raise ValueError(f"{name}: value_dtype must be None (the model's dtype, {dtype}) or torch.float8_e4m3fn "
                     f"(FP8 values with a scale per token and head), got {value_dtype!r}")
