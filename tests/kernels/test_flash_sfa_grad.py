"""Backward of flash_sfa: gradcheck in float64, gradients vs the oracle's autograd, dropped features get 0."""

import pytest
import torch
from sfa_oracle import oracle_keep, oracle_sfa
from test_flash_sfa import random_case

from sfa_compile import flash_sfa
from sfa_compile.kernels import ops


@pytest.mark.parametrize("seed", range(12))
def test_grads_match_oracle_autograd(seed):
    q, k, v, topk, kwargs = random_case(300 + seed)
    mask = kwargs.get("attn_mask")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    if mask is not None and mask.is_floating_point():
        inputs.append(mask.requires_grad_())
    grad_out = torch.randn(flash_sfa(q, k, v, topk=topk, **kwargs).shape, dtype=torch.float64)
    got = torch.autograd.grad(flash_sfa(q, k, v, topk=topk, **kwargs), inputs, grad_out)
    want = torch.autograd.grad(oracle_sfa(q, k, v, topk, **kwargs), inputs, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(is_causal=True),
    dict(enable_gqa=True),
    dict(attn_mask="float"),
    dict(attn_mask="bool", scale=0.7),
])
def test_gradcheck(kwargs):
    torch.manual_seed(1)
    q = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    heads = 2 if kwargs.get("enable_gqa") else 4
    k = torch.randn(2, heads, 7, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, heads, 7, 3, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v]
    if kwargs.get("attn_mask") == "float":
        kwargs = dict(kwargs, attn_mask=torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True))
        inputs.append(kwargs["attn_mask"])
    elif kwargs.get("attn_mask") == "bool":
        kwargs = dict(kwargs, attn_mask=torch.rand(5, 7) > 0.3)

    def fn(*args):
        extra = dict(kwargs, attn_mask=args[3]) if len(args) == 4 else kwargs
        return flash_sfa(args[0], args[1], args[2], topk=3, **extra)

    assert torch.autograd.gradcheck(fn, inputs)


def test_dropped_features_get_exactly_zero_grad():
    torch.manual_seed(2)
    q = torch.randn(1, 2, 6, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 16, dtype=torch.float64)
    flash_sfa(q, k, v, topk=4).square().sum().backward()
    assert bool((q.grad[~oracle_keep(q.detach(), 4)] == 0).all())
    assert bool((k.grad[~oracle_keep(k.detach(), 4)] == 0).all())
    assert (q.grad != 0).sum() > 0 and (k.grad != 0).sum() > 0


def test_broadcast_batch_grads_sum():
    torch.manual_seed(3)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    got = torch.autograd.grad(flash_sfa(q, k, v, topk=3), (q, k, v), g)
    want = torch.autograd.grad(oracle_sfa(q, k, v, 3), (q, k, v), g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_half_precision_backward_runs_in_float32():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flash_sfa(q, k, v, topk=4, is_causal=True).float().sum().backward()
    want = torch.autograd.grad(oracle_sfa(q, k, v, 4, is_causal=True).sum(), (q, k, v))
    for t, w in zip((q, k, v), want):
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.grad.double(), w.double(), rtol=2e-2, atol=2e-2)


class TestDropout:
    def setup_method(self):
        torch.manual_seed(5)
        self.q, self.k, self.v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))

    def test_reproducible_under_manual_seed(self):
        torch.manual_seed(11)
        a = flash_sfa(self.q, self.k, self.v, topk=3, dropout_p=0.4)
        torch.manual_seed(11)
        b = flash_sfa(self.q, self.k, self.v, topk=3, dropout_p=0.4)
        c = flash_sfa(self.q, self.k, self.v, topk=3, dropout_p=0.4)
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_unbiased(self):
        clean = flash_sfa(self.q, self.k, self.v, topk=3)
        mean = torch.stack([flash_sfa(self.q, self.k, self.v, topk=3, dropout_p=0.3) for _ in range(3000)]).mean(0)
        torch.testing.assert_close(mean, clean, rtol=0, atol=0.06)

    def test_each_output_is_a_dropped_mix_of_values(self):
        """With v = identity rows, the output exposes P * keep / (1 - p): entries are 0 or P / (1 - p)."""
        v = torch.eye(6, dtype=torch.float64).expand(1, 2, 6, 6)
        clean = flash_sfa(self.q, self.k, v, topk=3)
        dropped = flash_sfa(self.q, self.k, v, topk=3, dropout_p=0.5)
        ok = (dropped == 0) | torch.isclose(dropped, clean / 0.5)
        assert bool(ok.all()) and 0 < int((dropped == 0).sum()) < dropped.numel()

    def test_p_one_gives_zeros(self):
        assert bool((flash_sfa(self.q, self.k, self.v, topk=3, dropout_p=1.0) == 0).all())

    def test_gradcheck_with_fixed_seed(self):
        seed = torch.tensor(1234)
        inputs = [t.clone().requires_grad_() for t in (self.q, self.k, self.v)]
        fn = lambda q, k, v: ops.flash_sfa_op(q, k, v, 3, None, 0.3, False, None, False, seed)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_with_fewer_non_zeros_than_topk_keep_the_gradient_of_their_kept_zeros(dtype):
    """The backward reads the keep masks from the forward's q~, k~; in a row with fewer non-zeros than topk the
    selection also kept its lowest-index zeros, and their features still get gradient (the fast CPU engine for
    float32, the reference for float64)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g, dtype=dtype) for _ in range(3))
    q[0, 0, 3] = 0.0
    q[0, 1, 4, 5:] = 0.0  # 5 non-zeros: columns 5, 6, 7 are kept zeros at topk 8
    k[0, 1, 2] = 0.0
    k[0, 0, 6, 2:] = 0.0
    grad_out = torch.randn(1, 2, 9, 16, generator=g, dtype=dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(flash_sfa(*inputs, topk=8, is_causal=True), inputs, grad_out)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(oracle_sfa(*exact, 8, is_causal=True), exact, grad_out.double())
    for x, g_got, g_want in zip((q, k), got, want):
        assert not g_got[~oracle_keep(x, 8)].any()  # dropped features: exactly zero
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-5)
    # The case can tell: kept zeros with non-zero gradient exist (dropping them would fail the comparison above).
    assert want[0][0, 1, 4, 5:8].ne(0).sum() >= 2 and not want[0][0, 1, 4, 8:].any()
