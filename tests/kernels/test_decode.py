"""Decode over the compressed key cache: the cache format, the reference op, and the Triton kernels.

The reference is checked against plain dense SFA (``flash_sfa`` on each sequence's own keys, causal
alignment as an explicit mask); the Triton kernels (interpreter on the CPU, compiled on a GPU) against the
float64 reference with the prefill kernels' error rule. Cache slots past a sequence's length and every
kernel output start poisoned (NaN), so reading or leaving them shows.
"""

import pytest
import torch
from decode_helpers import DEVICE, assert_kernel_error, dense_decode, filled_cache, rotations

from sfa_compile import sparsify
from sfa_compile.functional import flash_sfa_decode
from sfa_compile.kernels import ops
from sfa_compile.kernels.kv_cache import CompressedKVCache
from sfa_compile.kernels.topk import project_by_key_head


def test_cache_round_trip_ragged_growth_and_bytes():
    torch.manual_seed(0)
    cache, keys, values = filled_cache(3, 2, 16, 4, [9, 4, 0])
    assert cache.host_lengths == [9, 4, 0] and cache.lengths.tolist() == [9, 4, 0]
    dense_keys, dense_values = cache.to_dense()
    want = sparsify(keys, 4).to_dense()
    for b, n in enumerate([9, 4, 0]):
        torch.testing.assert_close(dense_keys[b, :, :n], want[b, :, :n], rtol=0, atol=0)
        torch.testing.assert_close(dense_values[b, :, :n], values[b, :, :n], rtol=0, atol=0)
        assert not dense_keys[b, :, n:].any() and not dense_values[b, :, n:].any()
    # Growth past the capacity keeps what was cached.
    more_k, more_v = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    cache.append(more_k, more_v)
    assert cache.capacity >= 49 and cache.host_lengths == [49, 44, 40]
    torch.testing.assert_close(cache.to_dense()[0][1, :, :4], want[1, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(cache.to_dense()[0][1, :, 4:44], sparsify(more_k, 4).to_dense()[1], rtol=0, atol=0)
    # Bytes: (topk * (4 + 1) + 16 * 4) per token and key head (float32 values, uint8 indices).
    assert cache.nbytes == (49 + 44 + 40) * 2 * (4 * 5 + 16 * 4)
    assert cache.dense_nbytes == (49 + 44 + 40) * 2 * 2 * 16 * 4


def test_cache_index_dtype_select_crop_and_errors():
    assert CompressedKVCache(1, 1, 300, 8, torch.float16).key_indices.dtype == torch.int16
    cache, keys, _ = filled_cache(3, 1, 8, 2, [5, 3, 4])
    cache.select(torch.tensor([2, 0]))
    assert cache.host_lengths == [4, 5] and cache.lengths.tolist() == [4, 5]
    torch.testing.assert_close(cache.to_dense()[0][0, :, :4], sparsify(keys, 2).to_dense()[2, :, :4])
    cache.crop(3)
    assert cache.host_lengths == [3, 3] and cache.to_dense()[0].size(2) == 3
    with pytest.raises(ValueError, match="key heads 1"):
        cache.append(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    with pytest.raises(ValueError, match="counts"):
        cache.append(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8), counts=[2, 0])
    with pytest.raises(ValueError, match="topk"):
        CompressedKVCache(1, 1, 8, 9, torch.float32)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_reference_decode_equals_dense_sfa(q_len, group):
    torch.manual_seed(1)
    lengths = [17, 5]
    cache, keys, values = filled_cache(2, 2, 16, 4, lengths)
    query = torch.randn(2, 2 * group, q_len, 16)
    mask = torch.rand(2, 1, q_len, max(lengths)) > 0.3
    for attn_mask in (None, mask):
        got = flash_sfa_decode(query, cache, attn_mask=attn_mask)
        torch.testing.assert_close(got, dense_decode(query, keys, values, lengths, 4, attn_mask))


def test_decode_argument_errors():
    cache, _, _ = filled_cache(2, 2, 16, 4, [3, 3])
    kv, ki, v = cache.views()
    with pytest.raises(ValueError, match="must divide"):
        flash_sfa_decode(torch.randn(2, 3, 1, 16), cache)
    with pytest.raises(ValueError, match="stores 4 features"):
        ops.flash_sfa_decode_op(torch.randn(2, 2, 1, 16), kv, ki, v, cache.lengths, 5)
    with pytest.raises(ValueError, match="lengths must be int32"):
        ops.flash_sfa_decode_op(torch.randn(2, 2, 1, 16), kv, ki, v, cache.lengths.long(), 4)
    with pytest.raises(ValueError, match="boolean"):
        flash_sfa_decode(torch.randn(2, 2, 1, 16), cache, attn_mask=torch.zeros(2, 1, 1, 3))
    for shape in [(2, 1, 1, 4), (3, 1, 1, 3), (2, 2, 1, 1, 3), (1, 3)]:  # wrong size, batch; 5-D; 2-D
        with pytest.raises(ValueError, match="must be 4-D and broadcast"):
            flash_sfa_decode(torch.randn(2, 2, 1, 16), cache, attn_mask=torch.ones(shape, dtype=torch.bool))
    for shape in [(2, 2, 1, 3), (1, 1, 1, 3), (2, 1, 1, 3)]:
        flash_sfa_decode(torch.randn(2, 2, 1, 16), cache, attn_mask=torch.ones(shape, dtype=torch.bool))
    kv, _, _ = cache.views()
    with pytest.raises(TypeError, match="cache must be a CompressedKVCache .* got Tensor"):
        flash_sfa_decode(torch.randn(2, 2, 1, 16), kv)
    # Inference only on every device: no autograd graph, even for a query that requires grad.
    assert not flash_sfa_decode(torch.randn(2, 2, 1, 16, requires_grad=True), cache).requires_grad


def test_decode_step_argument_errors():
    """The step op checks the query and cache as the decode op does, and the new tokens as the append op does."""
    cache, _, _ = filled_cache(2, 2, 16, 4, [3, 3])
    kv, ki, v = cache.views()
    query, new = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    for keys, values in ((torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16)), (new, torch.randn(2, 2, 2, 16)),
                         (torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))):
        with pytest.raises(ValueError, match="flash_sfa_decode_step: keys .* must both be"):
            ops.flash_sfa_decode_step_op(query, kv, ki, v, cache.lengths, keys, values, 4)
    with pytest.raises(ValueError, match="flash_sfa_decode_step: lengths must be int32"):
        ops.flash_sfa_decode_step_op(query, kv, ki, v, cache.lengths.long(), new, new, 4)
    with pytest.raises(ValueError, match="flash_sfa_decode_step: the cache stores 4 features"):
        ops.flash_sfa_decode_step_op(query, kv, ki, v, cache.lengths, new, new, 5)
    assert cache.lengths.tolist() == [3, 3]  # nothing appended by a refused step


def test_append_op_writes_at_the_device_lengths_and_drops_tokens_past_the_capacity():
    """sfa::compressed_cache_append (what a compiled decode step calls): starts at each sequence's device
    length, advances it, never writes past the capacity (the lengths stop there)."""
    torch.manual_seed(4)
    cache = CompressedKVCache(2, 3, 16, 4, torch.float32, DEVICE, capacity=10, fixed=True)
    for t in (cache.key_values, cache.values):
        t.fill_(float("nan"))
    first_k, first_v = torch.randn(2, 3, 4, 16, device=DEVICE), torch.randn(2, 3, 4, 16, device=DEVICE)
    cache.append(first_k, first_v, [4, 1])
    keys, values = torch.randn(2, 3, 7, 16, device=DEVICE), torch.randn(2, 3, 7, 16, device=DEVICE)
    cache.append_on_device(keys, values)
    assert cache.lengths.tolist() == [10, 8] and cache.host_lengths == [10, 8]  # host lengths read back
    want = sparsify(keys, 4)
    for b, start in enumerate([4, 1]):
        n = min(7, 10 - start)
        torch.testing.assert_close(cache.key_values[b, :, start:start + n], want.values[b, :, :n], rtol=0, atol=0)
        torch.testing.assert_close(cache.key_indices[b, :, start:start + n], want.indices[b, :, :n], rtol=0, atol=0)
        torch.testing.assert_close(cache.values[b, :, start:start + n], values[b, :, :n], rtol=0, atol=0)
    assert cache.values[1, :, 8:].isnan().all()  # never written
    with pytest.raises(ValueError, match="fixed capacity"):
        CompressedKVCache(1, 3, 16, 4, torch.float32, DEVICE).append_on_device(keys[:1], values[:1])
    with pytest.raises(ValueError, match="lengths must be int32"):
        ops.compressed_cache_append_op(cache.key_values, cache.key_indices, cache.values, cache.lengths.long(), keys,
                                       values)


def test_mutating_ops_bump_the_version_of_what_they_write():
    """The Triton kernels write through raw pointers: the ops bump the cache tensors' version counters, as autograd
    expects of in-place ops (on the CPU the reference's in-place writes do it)."""
    cache, keys, values = filled_cache(1, 2, 16, 4, [3], device=DEVICE)
    written = (cache.key_values, cache.key_indices, cache.values, cache.lengths)
    before = [t._version for t in written]
    ops.compressed_cache_append_op(*written, keys[:, :, :1], values[:, :, :1])
    after = [t._version for t in written]
    assert all(a > b for a, b in zip(after, before))
    ops.flash_sfa_decode_step_op(torch.randn(1, 2, 1, 16, device=DEVICE), *written, keys[:, :, :1],
                                 values[:, :, :1], 4)
    assert all(t._version > a for t, a in zip(written, after))


def test_decode_step_equals_append_then_decode():
    """flash_sfa_decode with new_keys/new_values (sfa::flash_sfa_decode_step, what generation calls) equals
    appending the tokens and then decoding: same output, same cache contents and lengths (host and device), for a
    cache that must grow to take them and for a fixed one."""
    torch.manual_seed(6)
    r = rotations(2, 16, seed=2).to(DEVICE)
    for fixed in (False, True):
        for q_len in (1, 3):
            caches = [CompressedKVCache(2, 2, 16, 4, torch.float32, DEVICE, capacity=9, fixed=fixed) for _ in range(2)]
            old_k, old_v = torch.randn(2, 2, 8, 16, device=DEVICE), torch.randn(2, 2, 8, 16, device=DEVICE)
            for cache in caches:
                cache.append(old_k, old_v, [8, 5], projection=r)
            new_k, new_v = torch.randn(2, 2, q_len, 16, device=DEVICE), torch.randn(2, 2, q_len, 16, device=DEVICE)
            query = torch.randn(2, 6, q_len, 16, device=DEVICE)
            mask = torch.rand(2, 1, q_len, 8 + q_len, device=DEVICE) > 0.3
            if fixed:
                if q_len > 1:  # 8 + 3 tokens do not fit a fixed capacity of 9: refused before anything is written
                    before = [t.clone() for t in (*caches[0].views(), caches[0].lengths)]
                    with pytest.raises(ValueError, match="fixed capacity"):
                        flash_sfa_decode(query, caches[0], projection=r, new_keys=new_k, new_values=new_v)
                    assert all(torch.equal(a, b) for a, b in zip(before, (*caches[0].views(), caches[0].lengths)))
                    assert caches[0].host_lengths == [8, 5]
                    continue
                mask = torch.rand(2, 1, q_len, 9, device=DEVICE) > 0.3
            want_cache, got_cache = caches
            want_cache.append(new_k, new_v, projection=r)
            want = flash_sfa_decode(query, want_cache, projection=r, attn_mask=mask)
            got = flash_sfa_decode(query, got_cache, projection=r, attn_mask=mask, new_keys=new_k, new_values=new_v)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert got_cache.host_lengths == want_cache.host_lengths == [8 + q_len, 5 + q_len]
            assert torch.equal(got_cache.lengths, want_cache.lengths)
            for a, b in zip(got_cache.views(), want_cache.views()):
                for seq, length in enumerate(want_cache.host_lengths):
                    assert torch.equal(a[seq, :, :length], b[seq, :, :length])
    with pytest.raises(ValueError, match="come together"):
        flash_sfa_decode(query, caches[1], new_keys=new_k)
    # The op's schema (declared mutations), fake implementation and autograd registration are consistent.
    cache = CompressedKVCache(2, 2, 16, 4, torch.float32, DEVICE, capacity=12, fixed=True)
    cache.append(old_k, old_v, [8, 5])
    torch.library.opcheck(torch.ops.sfa.flash_sfa_decode_step.default,
                          (query[:, :, :1], *cache.views(), cache.lengths, new_k[:, :, :1], new_v[:, :, :1], 4),
                          {"projection": r})


# --- Triton kernels ---------------------------------------------------------------------------------------

def _triton():
    return pytest.importorskip("sfa_compile.kernels.triton_decode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("topk,head_dim", [(4, 16), (3, 24), (16, 32)])
def test_triton_append_matches_reference_cache(dtype, topk, head_dim):
    triton_decode = _triton()
    torch.manual_seed(2)
    keys = torch.randn(2, 3, 6, head_dim, dtype=dtype, device=DEVICE)
    keys[0, 0, 0, :4] = 1.5  # ties: the lower feature index wins
    values = torch.randn(2, 3, 6, head_dim, dtype=dtype, device=DEVICE)
    want, _, _ = filled_cache(2, 3, head_dim, topk, [1, 1], dtype=dtype, poison=False)
    want.append(keys.cpu(), values.cpu(), [6, 2])
    got = CompressedKVCache(2, 3, head_dim, topk, dtype, DEVICE, capacity=8)
    got.append(want.to_dense()[0][:, :, :1].to(DEVICE), want.to_dense()[1][:, :, :1].to(DEVICE))
    for t in (got.key_values, got.values):
        t[:, :, 1:].fill_(float("nan"))
    counts = torch.tensor([6, 2], dtype=torch.int32, device=DEVICE)
    triton_decode.append_compressed(got.key_values, got.key_indices, got.values, got.lengths, keys, values, counts)
    got.host_lengths = [7, 3]
    got.lengths.copy_(torch.tensor([7, 3]))
    for name in ("key_values", "key_indices", "values"):
        for b, n in enumerate([7, 3]):
            torch.testing.assert_close(getattr(got, name)[b, :, :n].cpu(), getattr(want, name)[b, :, :n],
                                       rtol=0, atol=0)
    # Uniform appends (the decode loop) read the start positions from the device lengths.
    uniform = CompressedKVCache(2, 3, head_dim, topk, dtype, DEVICE, capacity=8)
    uniform.lengths.fill_(1)
    triton_decode.append_compressed(uniform.key_values, uniform.key_indices, uniform.values, uniform.lengths, keys,
                                    values, None)
    for name in ("key_values", "key_indices", "values"):
        torch.testing.assert_close(getattr(uniform, name)[0, :, 1:7].cpu(), getattr(want, name)[0, :, 1:7],
                                   rtol=0, atol=0)
    # A full fixed cache (compiled decoding cannot check the capacity on the host): rows past it are dropped.
    full = CompressedKVCache(2, 3, head_dim, topk, dtype, DEVICE, capacity=8)
    full.values.fill_(float("nan"))
    full.lengths.fill_(5)
    triton_decode.append_compressed(full.key_values, full.key_indices, full.values, full.lengths, keys, values, None)
    torch.testing.assert_close(full.values[:, :, 5:].cpu(), values[:, :, :3].cpu(), rtol=0, atol=0)


# 8: a power of two, whose rows load without a per-entry mask. 2: one gather serves the whole key block (the
# interpreter's 16 keys x 2 indices fit the query tile's 32 columns); larger topk gathers 32 indices at a time.
@pytest.mark.parametrize("topk", [2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_len,group,lengths,masked", [
    (1, 4, [37, 1, 20], False),   # decode, GQA, one sequence with a single cached token
    (1, 1, [50, 50, 3], True),    # no GQA, a padding-style boolean mask
    (5, 2, [40, 9, 5], False),    # speculative: causal alignment to each sequence's end
    (16, 4, [33, 16, 70], True),  # 64 query rows per key head
])
def test_triton_decode_matches_reference(topk, dtype, q_len, group, lengths, masked, poisoned):
    triton_decode = _triton()
    torch.manual_seed(3)
    head_dim, key_heads = 24, 2
    cache, _, _ = filled_cache(3, key_heads, head_dim, topk, lengths, dtype=dtype, device=DEVICE)
    query = torch.randn(3, key_heads * group, q_len, head_dim, dtype=dtype, device=DEVICE)
    query[0, 0, 0, 2:topk + 5] = 9.0  # more top magnitudes tied than kept: the lower feature index wins
    query[1, -1, -1] = 0.0
    query[1, -1, -1, 1:3] = -1.0  # fewer non-zeros than topk (zeros fill up in index order)
    mask = None
    if masked:
        mask = torch.rand(3, 1, q_len, max(lengths), device=DEVICE) > 0.4
        mask[2] = False  # a sequence with every key masked: zeros
    kv, ki, v = cache.views()
    want = ops.flash_sfa_decode_reference(query.double(), kv.double(), ki, v.double(), cache.lengths, topk, None,
                                          mask)
    naive = ops.flash_sfa_decode_reference(query, kv, ki, v, cache.lengths, topk, None, mask)
    # 7: some splits hold no keys (the merge must ignore them); 2 warps: one or two rows per key head take 2 score
    # rows (4 with more warps).
    for splits, warps in ((None, None), (3, None), (7, 2)):
        got = triton_decode.decode(query, kv, ki, v, cache.lengths, topk, head_dim ** -0.5, mask, num_splits=splits,
                                   num_warps=warps)
        assert_kernel_error(got, want, naive, dtype)
        if masked:
            assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_triton_decode_relaunches_match_reference(poisoned):
    """After a shape's first launch the kernels run through the compiled kernel's own launcher (``Launcher``; the
    interpreter always takes Triton's JIT): fresh data, a query and values 2 bytes off 16-byte alignment (head dim
    32: value rows load as 16-byte vectors where aligned), and slot counts with and without a factor of 16 must
    each get a kernel specialized for them."""
    triton_decode = _triton()
    torch.manual_seed(6)
    dtype, head_dim, key_heads, group, topk = torch.float16, 32, 2, 2, 8
    for n_keys, offset in ((40, 0), (40, 0), (40, 1), (48, 0), (48, 1), (40, 0)):
        cache, _, _ = filled_cache(2, key_heads, head_dim, topk, [n_keys, 7], dtype=dtype, device=DEVICE)
        storage = torch.randn(2 * key_heads * group * head_dim + offset, dtype=dtype, device=DEVICE)
        query = storage[offset:].view(2, key_heads * group, 1, head_dim)
        kv, ki, v = cache.views()
        moved = torch.empty(v.numel() + offset, dtype=dtype, device=DEVICE)[offset:].view(v.shape).copy_(v)
        want = ops.flash_sfa_decode_reference(query.double(), kv.double(), ki, v.double(), cache.lengths, topk, None,
                                              None)
        naive = ops.flash_sfa_decode_reference(query, kv, ki, v, cache.lengths, topk, None, None)
        got = triton_decode.decode(query, kv, ki, moved, cache.lengths, topk, head_dim ** -0.5, None)
        assert_kernel_error(got, want, naive, dtype)


@pytest.mark.parametrize("dtype,q_len,head_dim", [(torch.float32, 2, 24), (torch.float16, 2, 24),
                                                  (torch.float32, 11, 24), (torch.float16, 1, 160)])
def test_triton_projection_fused_into_append_and_decode(dtype, q_len, head_dim, poisoned):
    """R given to the append and decode kernels equals projecting keys and queries beforehand (what the
    reference does); with topk = d an orthogonal R leaves attention unchanged. Head dim 160 takes the path
    that projects in torch before the kernels."""
    triton_decode = _triton()
    torch.manual_seed(4)
    batch, key_heads, group, topk, lengths = 2, 2, 3, 5, [23, 9]
    r = rotations(key_heads, head_dim).to(DEVICE)
    keys = torch.randn(batch, key_heads, 23, head_dim, dtype=dtype, device=DEVICE)
    values = torch.randn_like(keys)
    query = torch.randn(batch, key_heads * group, q_len, head_dim, dtype=dtype, device=DEVICE)  # 6 or 33 rows/head
    counts = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    fused = CompressedKVCache(batch, key_heads, head_dim, topk, dtype, DEVICE, capacity=30)
    triton_decode.append_compressed(fused.key_values, fused.key_indices, fused.values, fused.lengths, keys, values,
                                    counts, r)
    fused.lengths.copy_(counts)
    fused.host_lengths = lengths
    projected = CompressedKVCache(batch, key_heads, head_dim, topk, dtype, DEVICE, capacity=30)
    projected.append(project_by_key_head(keys, r), values, lengths)
    for b, n in enumerate(lengths):
        assert torch.equal(fused.key_indices[b, :, :n], projected.key_indices[b, :, :n])
        torch.testing.assert_close(fused.key_values[b, :, :n], projected.key_values[b, :, :n])
        assert torch.equal(fused.values[b, :, :n], projected.values[b, :, :n])
    kv, ki, v = projected.views()
    q_projected = project_by_key_head(query, r)
    want = ops.flash_sfa_decode_reference(q_projected.double(), kv.double(), ki, v.double(), projected.lengths, topk)
    naive = ops.flash_sfa_decode_reference(q_projected, kv, ki, v, projected.lengths, topk)
    got = triton_decode.decode(query, kv, ki, v, projected.lengths, topk, head_dim ** -0.5, None, r, num_splits=3)
    assert_kernel_error(got, want, naive, dtype)
    # topk = d: the rotation changes nothing (q R . k R = q . k), the result is dense attention.
    full = CompressedKVCache(batch, key_heads, head_dim, head_dim, dtype, DEVICE, capacity=30)
    full.append(keys, values, lengths, projection=r)
    kv, ki, v = full.views()
    got = triton_decode.decode(query, kv, ki, v, full.lengths, head_dim, head_dim ** -0.5, None, r)
    dense = dense_decode(query.double(), keys.double(), values.double(), lengths, head_dim)
    torch.testing.assert_close(got.double(), dense, rtol=0, atol=50 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype,q_len,projected,masked,head_dim,group", [
    (torch.float32, 1, True, True, 24, 3), (torch.float16, 1, False, False, 24, 3),
    (torch.float16, 4, True, False, 24, 3),
    (torch.float32, 4, False, True, 24, 3),  # the split kernel appends: causal among the new tokens, per-row mask
    (torch.float16, 1, True, False, 160, 3),  # R applied by torch before the kernels
    (torch.float16, 1, False, True, 64, 2),  # GQA 2 (a Qwen3-0.6B step): 2 score rows with 2 warps
])
def test_triton_decode_step_appends_attends_and_advances(dtype, q_len, projected, masked, head_dim, group,
                                                         poisoned):
    """decode() given the step's keys and values (without R the split kernel's extra program appends and attends
    to them, with R the prologue kernel appends them and the split kernel counts them; the merge kernel advances
    the lengths) leaves the cache exactly as append_compressed + advancing would and attends
    like the reference over it; a sequence at the fixed capacity drops what does not fit and stops there."""
    triton_decode = _triton()
    torch.manual_seed(8)
    batch, key_heads, topk, capacity = 3, 2, 5, 30
    r = rotations(key_heads, head_dim, seed=3).to(DEVICE) if projected else None
    lengths = [20, 7, capacity - 1]  # the last sequence has room for one new token only
    caches = [CompressedKVCache(batch, key_heads, head_dim, topk, dtype, DEVICE, capacity=capacity, fixed=True)
              for _ in range(2)]
    for cache in caches:
        for t in (cache.key_values, cache.values):
            t.fill_(float("nan"))
    old_k = torch.randn(batch, key_heads, capacity - 1, head_dim, dtype=dtype, device=DEVICE)
    old_v = torch.randn_like(old_k)
    for cache in caches:
        cache.append(old_k, old_v, lengths, projection=r)
    new_k = torch.randn(batch, key_heads, q_len, head_dim, dtype=dtype, device=DEVICE)
    new_v = torch.randn_like(new_k)
    query = torch.randn(batch, key_heads * group, q_len, head_dim, dtype=dtype, device=DEVICE)
    mask = (torch.rand(batch, 1, q_len, capacity, device=DEVICE) > 0.3) if masked else None
    want_cache, got_cache = caches
    want_cache.append_on_device(new_k, new_v, projection=r)  # the reference append op on the CPU
    kv, ki, v = want_cache.views()
    want = ops.flash_sfa_decode_reference(query.double(), kv.double(), ki, v.double(), want_cache.lengths, topk, None,
                                          mask, None if r is None else r.double())
    naive = ops.flash_sfa_decode_reference(query, kv, ki, v, want_cache.lengths, topk, None, mask, r)
    kv, ki, v = got_cache.views()
    got = triton_decode.decode(query, kv, ki, v, got_cache.lengths, topk, head_dim ** -0.5, mask, r, new_k, new_v,
                               num_splits=3, num_warps=2)
    assert got_cache.lengths.tolist() == want_cache.lengths.tolist() == [20 + q_len, 7 + q_len, capacity]
    for name in ("key_values", "key_indices", "values"):
        for b, n in enumerate(want_cache.lengths.tolist()):
            got_part, want_part = getattr(got_cache, name)[b, :, :n], getattr(want_cache, name)[b, :, :n]
            if name == "key_values" and r is not None:  # projected in the kernel vs by torch: rounding may differ
                torch.testing.assert_close(got_part, want_part)
            else:
                assert torch.equal(got_part, want_part)
    assert_kernel_error(got, want, naive, dtype)


def test_projection_argument_of_the_ops():
    """The ops' ``projection`` means "project by R of the key head first", on every device; bad R is refused."""
    torch.manual_seed(5)
    r = rotations(2, 16, seed=1).to(DEVICE)
    keys = torch.randn(1, 2, 6, 16, device=DEVICE)
    values = torch.randn(1, 2, 6, 16, device=DEVICE)
    query = torch.randn(1, 4, 1, 16, device=DEVICE)
    fused = CompressedKVCache(1, 2, 16, 4, torch.float32, DEVICE, capacity=8)
    fused.append(keys, values, projection=r)
    plain = CompressedKVCache(1, 2, 16, 4, torch.float32, DEVICE, capacity=8)
    plain.append(project_by_key_head(keys, r), values)
    assert torch.equal(fused.key_indices[:, :, :6], plain.key_indices[:, :, :6])
    torch.testing.assert_close(flash_sfa_decode(query, fused, projection=r),
                               flash_sfa_decode(project_by_key_head(query, r), plain))
    with pytest.raises(ValueError, match="projection must be a float tensor"):
        flash_sfa_decode(query, fused, projection=r[:1])
    with pytest.raises(ValueError, match="projection must be a float tensor"):
        fused.append(keys, values, projection=r.to(torch.int32))
