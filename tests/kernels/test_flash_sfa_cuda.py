"""The op on CUDA tensors (runs on the GPU machine; skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from sfa_compile import flash_sfa
from sfa_oracle import oracle_sfa

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


def test_cuda_backward_and_compile():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 33, 32, device="cuda", requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: flash_sfa(q, k, v, topk=4, is_causal=True), fullgraph=True)
    grads = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
    want = torch.autograd.grad(oracle_sfa(q, k, v, 4, is_causal=True).square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)
