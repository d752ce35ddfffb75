"""Forward of flash_sfa against the independent float64 oracle, and the topk = head-dim identity vs SDPA."""

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sfa_oracle import oracle_sfa
from torch.nn.attention import SDPBackend, sdpa_kernel

from sfa_compile import flash_sfa
from sfa_compile.kernels import reference


def random_case(seed):
    """Random SDPA-style problem: odd sizes, L != S, GQA ratios 1/2/4, bool/float/no mask, causal."""
    rng = random.Random(seed)
    batch = rng.choice([1, 2, 3])
    kv_heads = rng.choice([1, 2, 3])
    ratio = rng.choice([1, 2, 4])
    q_len, kv_len = rng.choice([1, 2, 5, 17, 33]), rng.choice([1, 3, 7, 19, 40])
    head_dim = rng.choice([4, 8, 13, 16, 32])
    v_dim = rng.choice([head_dim, 5])
    topk = rng.randint(1, head_dim)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * ratio, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, kv_len, v_dim, generator=g, dtype=torch.float64)
    kind = rng.choice(["none", "bool", "float", "causal"])
    kwargs = dict(enable_gqa=ratio > 1, scale=rng.choice([None, 0.3]))
    mask_shape = rng.choice([(q_len, kv_len), (batch, 1, q_len, kv_len), (1, kv_heads * ratio, 1, kv_len)])
    if kind == "bool":
        kwargs["attn_mask"] = torch.rand(mask_shape, generator=g) > 0.3
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(mask_shape, generator=g, dtype=torch.float64)
    elif kind == "causal":
        kwargs["is_causal"] = True
    return q, k, v, topk, kwargs


@pytest.mark.parametrize("seed", range(40))
def test_matches_oracle_float64(seed):
    q, k, v, topk, kwargs = random_case(seed)
    out = flash_sfa(q, k, v, topk=topk, **kwargs)
    expected = oracle_sfa(q, k, v, topk, **kwargs)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("seed", range(6))
def test_low_precision_vs_oracle(seed, dtype, tol):
    q, k, v, topk, kwargs = random_case(100 + seed)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
    out = flash_sfa(q, k, v, topk=topk, **kwargs)
    assert out.dtype == dtype
    expected = oracle_sfa(q, k, v, topk, **kwargs)  # same rounded inputs, float64 math
    # One rounding of the output to `dtype` plus float32 accumulation.
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), err


@pytest.mark.parametrize("seed", range(20))
def test_topk_equal_head_dim_is_sdpa(seed):
    q, k, v, _, kwargs = random_case(200 + seed)
    q, k, v = q.float(), k.float(), v.float()
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].float()
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    out = flash_sfa(q, k, v, topk=q.size(-1), **kwargs)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape_q,shape_kv", [((5, 8), (7, 8)), ((3, 5, 8), (3, 7, 8)),
                                              ((2, 1, 3, 5, 8), (2, 1, 3, 7, 8)), ((2, 4, 5, 8), (1, 4, 7, 8)),
                                              ((2, 4, 5, 8), (2, 1, 7, 8))])
def test_batch_dims_and_broadcasting_like_sdpa(shape_q, shape_kv):
    torch.manual_seed(0)
    q, k, v = torch.randn(shape_q), torch.randn(shape_kv), torch.randn(shape_kv)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(flash_sfa(q, k, v, topk=8), expected, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(flash_sfa(q, k, v, topk=3), oracle_sfa(q, k, v, 3).float(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape_qk, shape_v", [((1, 4, 5, 8), (2, 4, 5, 8)), ((2, 1, 5, 8), (2, 4, 5, 8))])
def test_value_batch_dims_broadcast_over_query_and_key_like_sdpa(shape_qk, shape_v):
    """v may have larger batch dims than q and k (SDPA broadcasts them): output, log-sum-exp and gradients."""
    torch.manual_seed(0)
    q, k = torch.randn(shape_qk, requires_grad=True), torch.randn(shape_qk, requires_grad=True)
    v = torch.randn(shape_v, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v)
    out = flash_sfa(q, k, v, topk=8)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-6)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(flash_sfa(q, k, v, topk=3), oracle_sfa(q, k, v, 3).float(), rtol=2e-5, atol=2e-6)


def test_sparsity_changes_the_result():
    """Guard against a path that silently ignores topk."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    assert (flash_sfa(q, k, v, topk=4) - flash_sfa(q, k, v, topk=16)).abs().max() > 1e-2


def test_no_overlap_scores_zero_not_masked():
    """A query and key with disjoint kept features score 0: softmax stays exact over all keys."""
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    k = torch.tensor([[[[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 3.0]]]])
    v = torch.tensor([[[[1.0], [3.0]]]])
    torch.testing.assert_close(flash_sfa(q, k, v, topk=1), torch.tensor([[[[2.0]]]]))


def test_fully_masked_rows_and_nan_follow_sdpa_math():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.rand(4, 6) > 0.4
    mask[1] = False
    with sdpa_kernel(SDPBackend.MATH):
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(dense[:, :, 1], torch.zeros_like(dense[:, :, 1]))
    for topk in (3, 8):
        assert torch.equal(flash_sfa(q, k, v, topk=topk, attn_mask=mask)[:, :, 1], dense[:, :, 1])
    q_nan, k_nan = q.clone(), k.clone()
    q_nan[0, 0, 2, 5] = float("nan")
    k_nan[0, 1, 3, 0] = float("nan")
    with sdpa_kernel(SDPBackend.MATH):
        dense_nan = F.scaled_dot_product_attention(q_nan, k_nan, v)
    for topk in (3, 8):
        out = flash_sfa(q_nan, k_nan, v, topk=topk)
        assert torch.equal(out.isnan(), dense_nan.isnan())


def test_empty_lengths():
    q, k, v = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    assert flash_sfa(q, k, v, topk=2).shape == (1, 2, 0, 4)
    out = flash_sfa(torch.randn(1, 2, 3, 8), k[:, :, :0], v[:, :, :0], topk=2)
    assert out.shape == (1, 2, 3, 4) and bool((out == 0).all())


def test_chunking_does_not_change_results(monkeypatch):
    q, k, v, topk, kwargs = random_case(7)
    kwargs.update(is_causal=False, attn_mask=torch.randn(q.size(-2), k.size(-2), dtype=torch.float64))
    full = flash_sfa(q, k, v, topk=topk, **kwargs)
    monkeypatch.setattr(reference, "SCORE_CHUNK_ELEMENTS", 1)  # one query row per chunk
    torch.testing.assert_close(flash_sfa(q, k, v, topk=topk, **kwargs), full, rtol=1e-12, atol=1e-12)


def test_long_sequence_on_cpu():
    """N = 8192 runs on a CPU in chunks (never 8192 x 8192 x heads scores at once) and matches SDPA at topk = d."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8192, 32) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(flash_sfa(q, k, v, topk=32, is_causal=True), expected, rtol=1e-4, atol=1e-5)
    assert flash_sfa(q, k, v, topk=4, is_causal=True).isfinite().all()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_ties_lower_index_wins_property(data):
    """Small integer features tie constantly: the kept sets must follow the lower-index rule exactly."""
    topk = data.draw(st.integers(1, 6))
    q_len, kv_len = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    ints = st.integers(-2, 2)
    q = torch.tensor(data.draw(st.lists(st.lists(ints, min_size=6, max_size=6), min_size=q_len, max_size=q_len)),
                     dtype=torch.float64)
    k = torch.tensor(data.draw(st.lists(st.lists(ints, min_size=6, max_size=6), min_size=kv_len, max_size=kv_len)),
                     dtype=torch.float64)
    v = torch.randn(kv_len, 3, dtype=torch.float64)
    torch.testing.assert_close(flash_sfa(q, k, v, topk=topk), oracle_sfa(q, k, v, topk), rtol=1e-12, atol=1e-12)
