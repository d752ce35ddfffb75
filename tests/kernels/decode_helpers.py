"""What the decode tests share: a cache filled with random tokens, SFA decode written with dense ``flash_sfa``, the
kernels' error rule, random orthogonal R."""

import torch

from sfa_compile import flash_sfa
from sfa_compile.kernels.kv_cache import CompressedKVCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled_cache(batch, key_heads, head_dim, topk, lengths, dtype=torch.float32, device="cpu", poison=True):
    """A cache holding random keys/values, the dense tensors it was built from, garbage past each length."""
    n = max(lengths)
    keys = torch.randn(batch, key_heads, n, head_dim, dtype=dtype, device=device)
    values = torch.randn(batch, key_heads, n, head_dim, dtype=dtype, device=device)
    cache = CompressedKVCache(batch, key_heads, head_dim, topk, dtype, device, capacity=n + 5)
    if poison:
        for t in (cache.key_values, cache.values):
            t.fill_(float("nan"))
        cache.key_indices.fill_(255 if cache.key_indices.dtype == torch.uint8 else 32767)
    cache.append(keys, values, lengths)
    return cache, keys, values


def dense_decode(query, keys, values, lengths, topk, attn_mask=None):
    """Per sequence: flash_sfa over its own keys, query t seeing keys up to length - T + t."""
    q_len = query.size(2)
    outs = []
    for b, n in enumerate(lengths):
        allowed = torch.ones(q_len, n, dtype=torch.bool, device=query.device).tril(n - q_len)
        if attn_mask is not None:
            allowed = allowed & attn_mask[b if attn_mask.size(0) > 1 else 0, :, :, :n]
        outs.append(flash_sfa(query[b:b + 1], keys[b:b + 1, :, :n], values[b:b + 1, :, :n], topk=topk,
                              attn_mask=allowed, enable_gqa=True))
    return torch.cat(outs)


def assert_kernel_error(got, want, naive, dtype):
    """The kernel's error against the float64 ``want`` is at most twice the same-precision reference's."""
    floor = 4 * torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
    assert (got.double() - want).abs().max().item() <= 2 * (naive.double() - want).abs().max().item() + floor


def rotations(key_heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(key_heads, head_dim, head_dim, generator=g, dtype=torch.float64))[0].float()
