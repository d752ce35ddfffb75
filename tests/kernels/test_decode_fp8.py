"""The compressed cache with FP8 values (``value_dtype=torch.float8_e4m3fn``): quantization, the container, the
reference ops and the Triton kernels (interpreter on the CPU, compiled on a GPU).

FP8 is lossy by design, so the container is checked against e4m3's rounding bound and the reference against dense
SFA over the dequantized values; the kernels against the float64 reference over the same FP8 bytes and scales
(the kernel error rule), and their writes byte for byte against the reference append's.
"""

import pytest
import torch
from decode_helpers import DEVICE, assert_kernel_error, dense_decode, rotations

from sfa_compile.functional import flash_sfa_decode
from sfa_compile.kernels import ops
from sfa_compile.kernels.cache_reference import dequantize_values, quantize_values
from sfa_compile.kernels.kv_cache import CompressedKVCache

try:  # a kernel of the append kernels' FP8 rounding alone (module level: Triton resolves its globals here)
    import triton
    import triton.language as tl

    from sfa_compile.kernels.triton_append import _round_to_e4m3

    @triton.jit
    def _convert_kernel(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, _round_to_e4m3(tl.load(X + i)).to(Y.dtype.element_ty))
except ImportError:
    _convert_kernel = None

FP8 = torch.float8_e4m3fn
E4M3_RELATIVE = 2.0 ** -4  # 3 mantissa bits: round to nearest is within half of 2^-3 of a normal number
E4M3_SUBNORMAL = 2.0 ** -10  # half the spacing of subnormals (2^-9), in units of the row's scale


def within_fp8_rounding(got: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> bool:
    """Each dequantized element is within e4m3's rounding of the original (relative, or absolute near zero)."""
    bound = torch.maximum(values.abs() * E4M3_RELATIVE, scales[..., None] * E4M3_SUBNORMAL) * (1 + 1e-6)
    return bool(((got.double() - values.double()).abs() <= bound).all())


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8 else torch.equal(a, b)


def test_quantize_values_scales_each_row_to_the_fp8_range():
    torch.manual_seed(0)
    values = torch.randn(3, 2, 7, 24) * torch.logspace(-6, 4, 7)[None, None, :, None]  # rows of any magnitude
    values[0, 0, 3] = 0.0  # an all-zero row: scale 0, zeros back
    values[1, 1, 2, 5] = -1e3  # a negative largest magnitude
    quantized, scales = quantize_values(values)
    assert quantized.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == values.shape[:3]
    torch.testing.assert_close(scales, values.abs().amax(-1) / 448, rtol=0, atol=0)
    largest = quantized.float().abs().amax(-1)
    assert torch.equal(largest[scales > 0], torch.full_like(largest[scales > 0], 448.0))
    assert scales[0, 0, 3] == 0 and not quantized[0, 0, 3].float().any()
    back = dequantize_values(quantized, scales, torch.float64)
    assert within_fp8_rounding(back, values.double(), scales)
    torch.testing.assert_close(back[1, 1, 2, 5].item(), -1e3, rtol=1e-6, atol=0)  # the largest maps to 448 exactly


def test_fp8_cache_round_trip_bytes_growth_select_and_crop():
    torch.manual_seed(1)
    lengths = [9, 4, 0]
    keys, values = torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    cache = CompressedKVCache(3, 2, 16, 4, torch.float32, capacity=5, value_dtype=FP8)
    plain = CompressedKVCache(3, 2, 16, 4, torch.float32, capacity=5)
    for c in (cache, plain):
        c.append(keys, values, lengths)
    assert cache.values.dtype == FP8 and cache.value_scales.shape == cache.values.shape[:3]
    dense_keys, dense_values = cache.to_dense()
    assert dense_values.dtype == torch.float32
    _, scales = quantize_values(values)
    for b, n in enumerate(lengths):  # keys are exactly the plain cache's; values within FP8 rounding
        assert torch.equal(dense_keys[b, :, :n], plain.to_dense()[0][b, :, :n])
        assert within_fp8_rounding(dense_values[b, :, :n], values[b, :, :n], scales[b, :, :n])
        assert not dense_values[b, :, n:].any()
    # Bytes per token and key head: topk * (4 + 1) + 16 FP8 values + a float32 scale; dense is the model dtype's.
    assert cache.nbytes == 13 * 2 * (4 * 5 + 16 + 4) and cache.dense_nbytes == plain.dense_nbytes == 13 * 2 * 2 * 16 * 4
    assert cache.capacity_nbytes == cache.capacity * 3 * 2 * (4 * 5 + 16 + 4)
    cache.select(torch.tensor([1, 0]))  # beam reorder: the scales follow their rows
    torch.testing.assert_close(cache.to_dense()[1][0, :, :4], dense_values[1, :, :4], rtol=0, atol=0)
    cache.crop(2)
    assert cache.host_lengths == [2, 2] and cache.to_dense()[1].size(2) == 2
    from_dense = CompressedKVCache.from_dense(keys, values, 4, lengths, value_dtype=FP8)
    assert torch.equal(from_dense.to_dense()[1], dense_values)


def test_value_dtype_and_scale_errors():
    with pytest.raises(ValueError, match="value_dtype must be None .* or torch.float8_e4m3fn"):
        CompressedKVCache(1, 1, 8, 2, torch.float32, value_dtype=torch.float16)
    assert CompressedKVCache(1, 1, 8, 2, torch.float16, value_dtype=torch.float16).value_scales is None
    cache = CompressedKVCache(2, 2, 16, 4, torch.float32, capacity=8, value_dtype=FP8)
    cache.append(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16))
    kv, ki, v = cache.views()
    query = torch.randn(2, 2, 1, 16)
    with pytest.raises(ValueError, match="value_scales must be given exactly when"):
        ops.flash_sfa_decode_op(query, kv, ki, v, cache.lengths, 4)
    with pytest.raises(ValueError, match="value_scales must be float32 of shape"):
        ops.flash_sfa_decode_op(query, kv, ki, v, cache.lengths, 4, value_scales=cache.scale_view().half())
    with pytest.raises(ValueError, match="value_scales must be given exactly when"):
        plain = CompressedKVCache(2, 2, 16, 4, torch.float32, capacity=8)
        ops.compressed_cache_append_op(plain.key_values, plain.key_indices, plain.values, plain.lengths,
                                       torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16),
                                       value_scales=torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="value may be float8_e4m3fn"):
        ops.flash_sfa_decode_op(query, kv, ki, v.to(torch.float16), cache.lengths, 4)


@pytest.mark.parametrize("q_len", [1, 3])
def test_fp8_reference_decode_is_dense_sfa_over_the_dequantized_values(q_len):
    torch.manual_seed(2)
    lengths = [17, 5]
    keys, values = torch.randn(2, 2, 17, 16), torch.randn(2, 2, 17, 16)
    cache = CompressedKVCache.from_dense(keys, values, 4, lengths, value_dtype=FP8)
    query = torch.randn(2, 4, q_len, 16)
    mask = torch.rand(2, 1, q_len, 17) > 0.3
    for attn_mask in (None, mask):
        got = flash_sfa_decode(query, cache, attn_mask=attn_mask)
        want = dense_decode(query, keys, cache.to_dense()[1], lengths, 4, attn_mask)
        torch.testing.assert_close(got, want)
    # A decode step over an FP8 cache appends (quantizing) and attends, as append then decode.
    stepped = CompressedKVCache.from_dense(keys, values, 4, lengths, value_dtype=FP8)
    new_k, new_v = torch.randn(2, 2, q_len, 16), torch.randn(2, 2, q_len, 16)
    versions = [t._version for t in stepped.buffers]
    got = flash_sfa_decode(query, stepped, new_keys=new_k, new_values=new_v)
    assert all(t._version > v for t, v in zip(stepped.buffers, versions))  # the scales too: a declared mutation
    cache.append(new_k, new_v)
    torch.testing.assert_close(got, flash_sfa_decode(query, cache), rtol=0, atol=0)
    for a, b in zip(stepped.buffers, cache.buffers):
        for seq, n in enumerate(cache.host_lengths):
            assert _same_bytes(a[seq, :, :n], b[seq, :, :n])
    torch.library.opcheck(torch.ops.sfa.flash_sfa_decode_step.default,
                          (query, *cache.views(), cache.lengths, new_k, new_v, 4),
                          {"value_scales": cache.scale_view()},
                          test_utils=("test_faketensor", "test_autograd_registration"))  # test_schema: no FP8 mul


# --- Triton kernels ---------------------------------------------------------------------------------------

def _triton():
    return pytest.importorskip("sfa_compile.kernels.triton_decode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("projected", [False, True])
def test_triton_append_quantizes_like_the_reference(dtype, projected, poisoned):
    """The append kernel writes the same FP8 bytes and scales as the reference append, ragged and past a full fixed
    capacity (dropped), with and without R."""
    triton_decode = _triton()
    torch.manual_seed(3)
    head_dim, topk = 24, 5
    r = rotations(3, head_dim, seed=1).to(DEVICE).to(dtype) if projected else None
    keys = torch.randn(2, 3, 6, head_dim, dtype=dtype, device=DEVICE)
    magnitudes = torch.tensor([1e-3, 50.0], dtype=dtype, device=DEVICE)[:, None, None, None]  # per sequence
    values = torch.randn(2, 3, 6, head_dim, dtype=dtype, device=DEVICE) * magnitudes
    values[1, 2, 1] = 0.0  # an all-zero row
    caches = [CompressedKVCache(2, 3, head_dim, topk, dtype, DEVICE, capacity=8, fixed=True, value_dtype=FP8)
              for _ in range(2)]
    for cache in caches:
        cache.lengths.copy_(torch.tensor([1, 4], dtype=torch.int32))
    counts = torch.tensor([6, 3], dtype=torch.int32, device=DEVICE)
    want, got = caches
    want_buffers = [t.cpu() for t in want.buffers]
    want_lengths = want.lengths.cpu()
    ops.compressed_cache_append_op(*want_buffers[:3], want_lengths, keys.cpu(), values.cpu(), counts.cpu(),
                                   None if r is None else r.cpu(), want_buffers[3])
    triton_decode.append_compressed(got.key_values, got.key_indices, got.values, got.lengths, keys, values, counts, r,
                                    got.value_scales)
    for b, (start, stop) in enumerate([(1, 7), (4, 7)]):
        for name, w, g in zip(("key_values", "key_indices", "values", "value_scales"), want_buffers, got.buffers):
            g = g[b, :, start:stop].cpu()
            w = w[b, :, start:stop]
            if name == "key_values" and r is not None:  # projected in the kernel vs by torch: rounding may differ
                torch.testing.assert_close(g, w)
            elif name in ("values", "value_scales") or r is None:
                assert _same_bytes(g, w), name
    # The last sequence was at slot 4 of 8 with 3 tokens: all fit; the first (6 from slot 1) fills up to 7.
    assert want_lengths.tolist() == [7, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_len,group,masked,topk", [(1, 4, False, 8), (5, 2, True, 5), (16, 1, False, 8)])
def test_triton_decode_over_fp8_values_matches_reference(dtype, q_len, group, masked, topk, poisoned):
    triton_decode = _triton()
    torch.manual_seed(4)
    head_dim, key_heads, lengths = 24, 2, [37, 16, 50]
    keys = torch.randn(3, key_heads, 50, head_dim, dtype=dtype, device=DEVICE)
    values = torch.randn(3, key_heads, 50, head_dim, dtype=dtype, device=DEVICE) * 30
    cache = CompressedKVCache.from_dense(keys, values, topk, lengths, value_dtype=FP8)
    query = torch.randn(3, key_heads * group, q_len, head_dim, dtype=dtype, device=DEVICE)
    mask = torch.rand(3, 1, q_len, 50, device=DEVICE) > 0.4 if masked else None
    kv, ki, v = cache.views()
    scales = cache.scale_view()
    want = ops.flash_sfa_decode_reference(query.double(), kv.double(), ki, v, cache.lengths, topk, None, mask, None,
                                          scales)
    naive = ops.flash_sfa_decode_reference(query, kv, ki, v, cache.lengths, topk, None, mask, None, scales)
    for splits in (None, 3):
        got = triton_decode.decode(query, kv, ki, v, cache.lengths, topk, head_dim ** -0.5, mask,
                                   value_scales=scales, num_splits=splits)
        assert_kernel_error(got, want, naive, dtype)


@pytest.mark.parametrize("dtype,q_len,projected,head_dim", [
    (torch.float16, 1, False, 24), (torch.float32, 4, False, 24),  # the split kernel appends and attends
    (torch.float16, 2, True, 24),  # the prologue kernel appends
    (torch.float16, 1, True, 160),  # R applied by torch before the kernels
])
def test_triton_decode_step_over_fp8_values(dtype, q_len, projected, head_dim, poisoned):
    """A decode step's kernels quantize the new values as the reference append does (same bytes, same scales) and
    attend like the reference over the cache they leave; the lengths advance."""
    triton_decode = _triton()
    torch.manual_seed(5)
    batch, key_heads, group, topk, capacity = 2, 2, 3, 5, 24
    r = rotations(key_heads, head_dim, seed=3).to(DEVICE) if projected else None
    old_k = torch.randn(batch, key_heads, 20, head_dim, dtype=dtype, device=DEVICE)
    old_v = torch.randn_like(old_k)
    caches = [CompressedKVCache(batch, key_heads, head_dim, topk, dtype, DEVICE, capacity=capacity, fixed=True,
                                value_dtype=FP8) for _ in range(2)]
    for cache in caches:
        cache.append(old_k, old_v, [20, 7], projection=r)
    new_k = torch.randn(batch, key_heads, q_len, head_dim, dtype=dtype, device=DEVICE)
    new_v = torch.randn_like(new_k) * 4
    query = torch.randn(batch, key_heads * group, q_len, head_dim, dtype=dtype, device=DEVICE)
    want_cache, got_cache = caches
    want_cache.append_on_device(new_k, new_v, projection=r)
    kv, ki, v = want_cache.views()
    scales = want_cache.scale_view()
    want = ops.flash_sfa_decode_reference(query.double(), kv.double(), ki, v, want_cache.lengths, topk, None, None,
                                          None if r is None else r.double(), scales)
    naive = ops.flash_sfa_decode_reference(query, kv, ki, v, want_cache.lengths, topk, None, None, r, scales)
    kv, ki, v = got_cache.views()
    got = triton_decode.decode(query, kv, ki, v, got_cache.lengths, topk, head_dim ** -0.5, None, r, new_k, new_v,
                               got_cache.scale_view(), num_splits=3)
    assert got_cache.lengths.tolist() == want_cache.lengths.tolist() == [20 + q_len, 7 + q_len]
    for name, g, w in zip(("key_values", "key_indices", "values", "value_scales"), got_cache.buffers,
                          want_cache.buffers):
        for b, n in enumerate(want_cache.lengths.tolist()):
            if name == "key_values" and r is not None:
                torch.testing.assert_close(g[b, :, :n], w[b, :, :n])
            else:
                assert _same_bytes(g[b, :, :n], w[b, :, :n]), name
    assert_kernel_error(got, want, naive, dtype)


def test_fp8_rounding_of_the_append_kernels_is_torchs(poisoned):
    """The append kernels' FP8 conversion rounds like torch's ``.to(torch.float8_e4m3fn)`` (to nearest, ties to
    even) for every positive and negative e4m3 value, every midpoint and its neighbours (subnormals included), and
    random values: byte for byte."""
    if _convert_kernel is None:
        pytest.skip("needs Triton")
    torch.manual_seed(7)
    representable = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()  # 0 .. 448
    midpoints = (representable[:-1] + representable[1:]) / 2
    below, above = midpoints.nextafter(torch.tensor(0.0)), midpoints.nextafter(torch.tensor(1e4))
    x = torch.cat([representable, midpoints, below, above, torch.rand(2000) * 448, torch.rand(500) * 0.02])
    x = torch.cat([x, -x, torch.zeros(8192 - 2 * x.numel())]).to(DEVICE)
    y = torch.empty(8192, dtype=FP8, device=DEVICE)
    _convert_kernel[(1,)](x, y, 8192)
    assert torch.equal(y.view(torch.uint8), x.to(FP8).view(torch.uint8))
