"""The Triton kernels (top-k, flash forward and backward) against the float64 oracle.

Without a GPU they run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET) at small
sizes; on a GPU the same tests run compiled. Outputs are allocated poisoned (NaN, True) so a tile the
kernels forget to write fails. Error rule (issue #4): the kernel's error against float64 is at most about
2x the error of the same computation done naively in the input precision.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from sfa_oracle import oracle_keep, oracle_sfa  # noqa: E402

from sfa_compile.kernels import prefill, reference  # noqa: E402
from sfa_compile.kernels.topk import kept_features, sparsify_dense  # noqa: E402
from sfa_compile.kernels.triton_topk import default_search, sparsify_triton, zero_dropped_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def naive(q, k, v, topk, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """SFA computed plainly in the inputs' own precision: the error baseline for the kernels."""
    q = torch.where(oracle_keep(q.detach(), topk), q, 0)
    k = torch.where(oracle_keep(k.detach(), topk), k, 0)
    if enable_gqa and q.size(-3) != k.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.size(-1)) if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def max_err(x, want):
    return (x.double() - want).abs().max().item()


def assert_within_2x(got, base, want, dtype):
    floor = 4 * torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
    assert max_err(got, want) <= 2 * max_err(base, want) + floor, (max_err(got, want), max_err(base, want))


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


# (q shape, k shape, v shape, topk, kwargs); odd sizes, L != S, GQA, masks, 3-D and 5-D inputs.
CASES = {
    "causal_gqa": ((2, 4, 37, 64), (2, 2, 37, 64), (2, 2, 37, 64), 8, dict(is_causal=True, enable_gqa=True)),
    "cross_value_dim": ((1, 2, 20, 32), (1, 2, 45, 32), (1, 2, 45, 48), 1, dict(scale=0.3)),
    "causal_more_queries": ((1, 3, 50, 40), (1, 3, 19, 40), (1, 3, 19, 40), 40, dict(is_causal=True)),
    "key_padding": ((2, 2, 33, 64), (2, 2, 29, 64), (2, 2, 29, 64), 16, dict(attn_mask="padding")),
    "additive_2d": ((1, 2, 17, 32), (1, 1, 40, 32), (1, 1, 40, 32), 5, dict(attn_mask="additive", enable_gqa=True)),
    "three_dim": ((3, 21, 16), (3, 21, 16), (3, 21, 16), 4, dict(is_causal=True)),
    "five_dim_broadcast": ((2, 2, 3, 9, 32), (1, 2, 3, 11, 32), (1, 2, 3, 11, 32), 7, {}),
    "head_dim_128": ((1, 2, 24, 128), (1, 2, 24, 128), (1, 2, 24, 128), 16, dict(is_causal=True)),
    "head_dim_256": ((1, 1, 18, 256), (1, 1, 18, 256), (1, 1, 18, 256), 9, {}),
}


def make_case(name, dtype, seed=0):
    q_shape, k_shape, v_shape, topk, kwargs = CASES[name]
    q, k, v = (randn(*s, dtype=dtype, seed=seed + i) for i, s in enumerate((q_shape, k_shape, v_shape)))
    kwargs = dict(kwargs)
    L, S = q_shape[-2], k_shape[-2]
    if kwargs.get("attn_mask") == "padding":  # (B, 1, 1, S); batch 1 has every key masked
        keep = torch.rand(q_shape[0], 1, 1, S, generator=torch.Generator().manual_seed(seed)) > 0.3
        keep[1] = False
        kwargs["attn_mask"] = keep.to(DEVICE)
    elif kwargs.get("attn_mask") == "additive":
        kwargs["attn_mask"] = randn(L, S, dtype=torch.float32, seed=seed + 9)
    return q, k, v, topk, kwargs


def op_args(q, k, v, topk, kwargs):
    return (q, k, v, topk, kwargs.get("attn_mask"), 0.0, kwargs.get("is_causal", False), kwargs.get("scale"),
            kwargs.get("enable_gqa", False), None)


# The Triton kernels, and whatever engine the rules pick for the case on this device (prefill.py).
ENGINES = [prefill.TRITON, None]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_oracle(name, dtype, engine, poisoned):
    q, k, v, topk, kwargs = make_case(name, dtype)
    out, lse, _, _ = prefill.forward(*op_args(q, k, v, topk, kwargs), engine=engine)
    want = oracle_sfa(q, k, v, topk, **kwargs)
    assert out.shape == want.shape and out.dtype == dtype
    assert_within_2x(out, naive(q, k, v, topk, **kwargs), want, dtype)
    _, ref_lse = reference.flash_sfa_reference(*op_args(q.double(), k.double(), v.double(), topk, kwargs))
    finite = ref_lse.isfinite()
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-4
    if engine == prefill.TRITON:  # ours marks a fully masked row's lse +inf
        assert torch.equal(lse.isinf(), ref_lse.isinf())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["causal_gqa", "cross_value_dim", "causal_more_queries", "key_padding",
                                  "additive_2d", "five_dim_broadcast"])
@pytest.mark.parametrize("engine", ENGINES)
def test_backward_matches_oracle(name, dtype, engine, poisoned):
    q, k, v, topk, kwargs = make_case(name, dtype, seed=3)
    args = op_args(q, k, v, topk, kwargs)
    out, lse, q_sparse, k_sparse = prefill.forward(*args, engine=engine)
    d_out = randn(*out.shape, dtype=dtype, seed=7)
    dense = topk >= q.size(-1)  # the backward reads q~, k~ (q, k themselves when nothing is dropped)
    assert (q_sparse.numel() == 0) == dense
    dq, dk, dv, d_mask = prefill.backward(d_out, q if dense else q_sparse, k if dense else k_sparse, v, out, lse,
                                          *args[3:], mask_grad=False, query_shape=list(q.shape),
                                          key_shape=list(k.shape), engine=engine)
    assert d_mask is None
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(oracle_sfa(*inputs, topk, **kwargs), inputs, d_out.double())
    base = torch.autograd.grad(naive(*inputs, topk, **kwargs), inputs, d_out)
    for got, b, w, x in zip((dq, dk, dv), base, want, (q, k, v)):
        assert got.shape == x.shape and got.dtype == dtype
        assert_within_2x(got, b, w, dtype)
    # Gradients flow only through kept features: exactly zero elsewhere.
    assert not dq[~oracle_keep(q, topk)].any() and not dk[~oracle_keep(k, topk)].any()


@pytest.mark.parametrize("search,dtype", [(None, torch.float32), (None, torch.float16), (None, torch.bfloat16),
                                          ("bit", torch.bfloat16), ("rank", torch.float16), ("rank", torch.bfloat16)])
@pytest.mark.parametrize("head_dim,topk", [(64, 8), (128, 16), (32, 1), (80, 80), (256, 7)])
def test_topk_kernel_matches_sort(head_dim, topk, dtype, search, poisoned):
    x = randn(2, 3, 37, head_dim, dtype=dtype, seed=head_dim + topk)
    x[0, 0, 0, :5] = 1.0  # ties: lower index wins
    x[0, 0, 1, 3] = float("nan")  # NaN ranks above everything, as in torch.sort
    # A second NaN with another payload ranks equal to the first: index order decides (the bit search only where
    # the row holds at most topk NaN: module docstring).
    if dtype != torch.float32 and (topk >= 2 or (search or default_search(dtype, topk)) != "bit"):
        x[0, 0, 1, 6] = torch.tensor(0x7E01 if dtype == torch.float16 else 0x7FC1, dtype=torch.int16).view(dtype)
    x[0, 1, 2] = 0.0  # fewer non-zeros than topk still keeps exactly topk
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    y = sparsify_triton(strided, topk, search)
    ref_y, ref_keep = sparsify_dense(x, topk)
    assert torch.equal(y.nan_to_num(), ref_y.nan_to_num()) and y.is_contiguous()
    # The backward's keep mask, read from x~ alone (a row of zeros included), is the selection's.
    assert torch.equal(kept_features(y, topk), ref_keep)
    grad = randn(*x.shape, dtype=dtype, seed=1)
    assert torch.equal(zero_dropped_triton(grad.clone(), y, topk), torch.where(ref_keep, grad, 0))


@pytest.mark.parametrize("search,dtype", [("rank", torch.float32), ("bitonic", torch.float16), ("sort", torch.float16)])
def test_topk_search_outside_its_domain_is_refused(search, dtype):
    with pytest.raises(ValueError, match="search must be one of"):
        sparsify_triton(randn(1, 1, 4, 16, dtype=dtype, seed=0), 4, search)


class TestFallback:
    """What the kernels do not cover runs on the reference, with one warning per reason."""

    def setup_method(self):
        prefill._warned.clear()

    def test_dropout_and_float64_warn_once_and_match_reference(self):
        q, k, v, topk, kwargs = make_case("three_dim", torch.float64)
        args = list(op_args(q, k, v, topk, kwargs))
        with pytest.warns(UserWarning, match="float64 inputs"):
            out = prefill.forward(*args)[0]
        torch.testing.assert_close(out, oracle_sfa(q, k, v, topk, **kwargs))
        args = list(op_args(q.float(), k.float(), v.float(), topk, {}))
        args[5], args[9] = 0.5, torch.tensor(11)
        with pytest.warns(UserWarning, match="dropout_p > 0"):
            out = prefill.forward(*args)[0]
        torch.testing.assert_close(out, reference.flash_sfa_reference(*args)[0])
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prefill.forward(*args)  # second time: silent

    def test_mask_gradient_falls_back(self):
        q, k, v, topk, kwargs = make_case("additive_2d", torch.float32)
        args = op_args(q, k, v, topk, kwargs)
        out, lse, q_sparse, k_sparse = prefill.forward(*args)
        with pytest.warns(UserWarning, match="gradients with respect to attn_mask"):  # from q~, k~: same features
            grads = prefill.backward(torch.ones_like(out), q_sparse, k_sparse, v, out, lse, *args[3:], mask_grad=True,
                                     query_shape=list(q.shape), key_shape=list(k.shape))
        want = reference.flash_sfa_backward_reference(torch.ones_like(out), *args, mask_grad=True)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w)
