"""The run-time top-k (``sparsify_fast`` and its ``select_mask``, what the CPU path runs) against the stable-sort
definition, and the prefill engine rules on the CPU."""

import pytest
import torch

from sfa_compile.kernels.topk import kept_features, select_mask, sparsify_dense, sparsify_fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("head_dim,topk", [(64, 8), (128, 16), (32, 1), (80, 79), (24, 7)])
def test_sparsify_fast_equals_the_sort(head_dim, topk, dtype):
    g = torch.Generator().manual_seed(head_dim * 7 + topk)
    x = torch.randn(2, 3, 37, head_dim, generator=g).to(dtype)
    x[0, 0, 0, :5] = 1.0  # ties at the threshold: lower index wins
    x[0, 0, 1, :topk + 3] = -2.0  # ties across signs
    x[0, 0, 2, 3] = float("nan")  # NaN ranks above everything
    x[0, 0, 3, 5] = float("inf")
    x[0, 1, 2] = 0.0  # fewer non-zeros than topk: still exactly topk kept
    x[1, 2, 4, ::2] = -0.0
    y = sparsify_fast(x.transpose(1, 2).contiguous().transpose(1, 2), topk)
    want_y, want_keep = sparsify_dense(x, topk)
    assert torch.equal(y.nan_to_num(), want_y.nan_to_num()) and torch.equal(y.isnan(), want_y.isnan())
    assert torch.equal(select_mask(x, topk), want_keep)
    # What the backward reads instead of a second top-k: the keep mask from x~ alone, ties and zero rows included.
    keep = kept_features(y, topk)
    assert torch.equal(keep, want_keep) and bool((keep.sum(-1) == topk).all())


@pytest.mark.parametrize("topk", [1, 3, 5])
def test_kept_features_of_rows_with_fewer_non_zeros_than_topk(topk):
    """x had fewer than topk non-zeros: the selection kept them all plus the lowest-index zeros (either sign);
    x~ == x there, and the mask read back from x~ must name the same zeros. Sparsifying x~ again keeps the same
    features (the reference backward relies on it)."""
    x = torch.tensor([[0.0, -0.0, 3.0, 0.0, 0.0, -1.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-0.0, 2.0, float("nan"), 0.0, 5.0, 4.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    y, want = sparsify_dense(x, topk)
    assert torch.equal(kept_features(y, topk), want)
    assert torch.equal(sparsify_dense(y, topk)[1], want)


def test_engine_rules_on_cpu():
    """kernels/prefill.py on the CPU: SDPA's CPU flash kernel, the reference where it cannot run the call."""
    from sfa_compile.kernels import prefill

    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    assert prefill.engine_for(q, k, v, is_causal=True, enable_gqa=True) == prefill.CPU_FLASH
    assert prefill.engine_for(q, k, v, attn_mask=torch.ones(9, 9, dtype=torch.bool), enable_gqa=True) == \
        prefill.CPU_FLASH
    assert prefill.engine_for(q, k, v, attn_mask=torch.zeros(9, 9, dtype=torch.float64), enable_gqa=True) == \
        prefill.REFERENCE  # the kernel takes masks in the query's dtype only
    assert prefill.engine_for(q, k, v[..., :8], enable_gqa=True) == prefill.REFERENCE  # value head dim differs
    assert prefill.engine_for(q, k, v, dropout_p=0.1, enable_gqa=True) == prefill.REFERENCE
    assert prefill.engine_for(q.double(), k.double(), v.double(), enable_gqa=True) == prefill.REFERENCE
