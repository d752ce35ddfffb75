"""The op on CUDA tensors: the Triton kernels at realistic sizes and precisions (skipped without CUDA)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from sfa_oracle import oracle_sfa
from test_flash_sfa_triton import assert_within_2x, naive

from sfa_compile import flash_sfa
from sfa_compile.kernels import prefill

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_oracle_and_sdpa(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 8, 67, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 67, 64, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 67, 64, device="cuda", dtype=dtype)
    out = flash_sfa(q, k, v, topk=8, is_causal=True, enable_gqa=True)
    want = oracle_sfa(q.cpu(), k.cpu(), v.cpu(), 8, is_causal=True, enable_gqa=True)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert (out.cpu().double() - want).abs().max().item() < tol
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    full = flash_sfa(q, k, v, topk=64, is_causal=True, enable_gqa=True)
    assert (full.double() - dense.double()).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("key_heads", [4, 2])  # the engines: SDPA cuDNN (heads equal), our Triton kernels (GQA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,topk,causal", [(64, 8, True), (128, 16, True), (128, 8, False), (64, 64, True)])
def test_engines_at_size_within_2x_of_same_precision(head_dim, topk, causal, dtype, key_heads):
    """Forward and backward through the op (no fallback) vs float64, at a few hundred tokens."""
    g = torch.Generator(device="cuda").manual_seed(head_dim + topk)
    q = torch.randn(1, 4, 515, head_dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, key_heads, 515, head_dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, key_heads, 515, head_dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
    d_out = torch.randn(1, 4, 515, head_dim, device="cuda", dtype=dtype, generator=g)
    kwargs = dict(is_causal=causal, enable_gqa=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = flash_sfa(q, k, v, topk=topk, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), d_out)
    want = oracle_sfa(q, k, v, topk, **kwargs)
    base = naive(q, k, v, topk, **kwargs)
    assert_within_2x(out, base, want, dtype)
    want_grads = torch.autograd.grad(want, (q, k, v), d_out.double())
    base_grads = torch.autograd.grad(base, (q, k, v), d_out)
    for got, b, w in zip(grads, base_grads, want_grads):
        assert_within_2x(got, b, w, dtype)


def test_cuda_backward_and_compile():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 33, 32, device="cuda", requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: flash_sfa(q, k, v, topk=4, is_causal=True), fullgraph=True)
    grads = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
    want = torch.autograd.grad(oracle_sfa(q, k, v, 4, is_causal=True).square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_engine_rules_on_cuda():
    """The rule table of kernels/prefill.py: SDPA's backends where they take the call, ours elsewhere."""
    def qkv(dtype=torch.bfloat16, key_heads=4, length=64, keys=64):
        return (torch.randn(1, 4, length, 64, device="cuda", dtype=dtype),
                torch.randn(1, key_heads, keys, 64, device="cuda", dtype=dtype),
                torch.randn(1, key_heads, keys, 64, device="cuda", dtype=dtype))

    assert prefill.engine_for(*qkv(), is_causal=True) in (prefill.CUDNN, prefill.FLASH)
    assert prefill.engine_for(*qkv(key_heads=2), is_causal=True, enable_gqa=True) == prefill.TRITON
    mask = torch.ones(64, 64, dtype=torch.bool, device="cuda").tril()
    assert prefill.engine_for(*qkv(), attn_mask=mask) == prefill.TRITON
    assert prefill.engine_for(*qkv(torch.float32), is_causal=True) == prefill.TRITON
    assert prefill.engine_for(*qkv(length=16), is_causal=True) == prefill.TRITON  # L != S causal
    assert prefill.engine_for(*qkv(torch.float64)) == prefill.REFERENCE


def _attention_inputs(length, seed):
    """q, k contiguous; v a view of one fused projection's output, as GPT-2's attention makes it (cuDNN keys its
    graphs on these layouts)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(2, 4, length, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    fused = torch.randn(2, length, 3 * 4 * 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = fused[..., 2 * 256:].view(2, length, 4, 64).transpose(1, 2)
    return q, k, v


def _grad_in_layout(shape, transposed, seed):
    """A random output gradient, contiguous or as the transpose of a (batch, length, heads, d) tensor (what reaches
    attention when the model transposes its output)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if transposed:
        return torch.randn(shape[0], shape[2], shape[1], shape[3], device="cuda", dtype=torch.bfloat16,
                           generator=g).transpose(1, 2)
    return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)


def _assert_gradients_close(got, want):
    """Each bf16 gradient within 2% (relative norm) of its float64 expectation."""
    for a, b in zip(got, want):
        assert (a.double() - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("sdpa_first", [True, False])
@pytest.mark.parametrize("sdpa_transposed,ours_transposed", [(True, False), (False, True), (True, True)])
def test_gradients_stay_right_beside_sdpa_cudnn_on_the_same_layouts(sdpa_first, sdpa_transposed, ours_transposed):
    """SDPA's own cuDNN backward and the op's, on equal q~, k~, v layouts with output gradients of different
    layouts, in either order: each keeps its own gradients (cuDNN graphs cached per layout must not be shared)."""
    length = 192 + 16 * (4 * sdpa_first + 2 * sdpa_transposed + ours_transposed)  # one graph key per case
    q, k, v = _attention_inputs(length, seed=length)
    if prefill.engine_for(q, k, v, is_causal=True) != prefill.CUDNN:
        pytest.skip("SDPA's cuDNN backend does not take these arguments here")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_grads():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # layouts kept
        d_out = _grad_in_layout(q.shape, sdpa_transposed, seed=1)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True)
        got = torch.autograd.grad(out, leaves, d_out)
        exact = [t.detach().double().requires_grad_() for t in leaves]
        want = torch.autograd.grad(F.scaled_dot_product_attention(*exact, is_causal=True), exact, d_out.double())
        _assert_gradients_close(got, want)

    def op_grads():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # layouts kept
        d_out = _grad_in_layout(q.shape, ours_transposed, seed=2)
        got = torch.autograd.grad(flash_sfa(*leaves, topk=8, is_causal=True), leaves, d_out)
        want = torch.autograd.grad(oracle_sfa(*leaves, 8, is_causal=True), leaves, d_out.double())
        _assert_gradients_close(got, want)

    first, second = (sdpa_grads, op_grads) if sdpa_first else (op_grads, sdpa_grads)
    first()
    second()


@pytest.mark.parametrize("forward_backends", ["flash", "math"])
def test_backend_flags_changed_between_forward_and_backward(forward_backends):
    """A forward under ``sdpa_kernel`` (which the engine rules honour) and its backward outside it, as a training
    loop that wraps only the model call does: the gradients are still right, whichever engines the two picked."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[forward_backends]
    q, k, v = _attention_inputs(320, seed=5)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    d_out = _grad_in_layout(q.shape, False, seed=6)
    with sdpa_kernel(backends):
        out = flash_sfa(*leaves, topk=8, is_causal=True)
    got = torch.autograd.grad(out, leaves, d_out)
    want = torch.autograd.grad(oracle_sfa(*leaves, 8, is_causal=True), leaves, d_out.double())
    _assert_gradients_close(got, want)


def test_straight_through_gradients_with_a_transposed_output_gradient():
    """Fine-tuning's straight-through attention with the output gradient a Hugging Face model hands back (the
    transpose of (batch, length, heads, d)), after SDPA's own cuDNN backward ran on the same layouts: every
    feature's gradient equals float64 dense attention's on the sparsified q and k."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sfa_compile.kernels.topk import sparsify_dense
    from sfa_compile.training.straight_through import sfa_attention

    q, k, v = _attention_inputs(336, seed=7)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # a cuDNN graph of SDPA's own for these layouts, contiguous dO
        torch.autograd.grad(F.scaled_dot_product_attention(*leaves, is_causal=True), leaves,
                            _grad_in_layout(q.shape, False, seed=8))
    d_out = _grad_in_layout(q.shape, True, seed=9)
    got = torch.autograd.grad(sfa_attention(*leaves, topk=8, straight_through=True, is_causal=True), leaves, d_out)
    exact = [sparsify_dense(t.detach().double(), 8)[0].requires_grad_() for t in (q, k)]
    exact.append(v.detach().double().requires_grad_())
    want = torch.autograd.grad(F.scaled_dot_product_attention(*exact, is_causal=True), exact, d_out.double())
    _assert_gradients_close(got, want)
