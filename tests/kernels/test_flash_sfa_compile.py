"""sfa::flash_sfa as a custom op: opcheck, torch.compile (fullgraph, every backend, fwd + bwd), torch.export."""

import pytest
import torch

import sfa_compile
from sfa_compile import flash_sfa


def sample_inputs():
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)

    yield (r(2, 4, 5, 8), r(2, 4, 7, 8), r(2, 4, 7, 6), 3), {}
    yield (r(2, 4, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 8), 8), {"enable_gqa": True, "is_causal": True}
    yield (r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), 2), {"attn_mask": r(5, 5), "scale": 0.5}
    yield (r(3, 6, 8), r(3, 4, 8), r(3, 4, 8), 5), {"attn_mask": torch.rand(6, 4, generator=g) > 0.5}
    yield (r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), 4), {"dropout_p": 0.2, "dropout_seed": torch.tensor(7)}
    # Non-contiguous views (as after .transpose(1, 2) in real models) and an expanded float mask with grad.
    views = [r(2, 5, 4, 8, grad=False).transpose(1, 2).requires_grad_() for _ in range(3)]
    mask = r(1, 1, 5, 5, grad=False).expand(2, 4, 5, 5).requires_grad_()
    yield (*views, 3), {"attn_mask": mask}


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    args, kwargs = list(sample_inputs())[case]
    torch.library.opcheck(torch.ops.sfa.flash_sfa.default, args, kwargs)


class Attention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return flash_sfa(q, k, v, topk=3, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    q = torch.randn(2, 4, 9, 16, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, requires_grad=True)
    v = torch.randn(2, 2, 11, 16, requires_grad=True)
    mask = torch.randn(9, 11)
    model = Attention()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(q, k, v, mask)
    expected = model(q, k, v, mask)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    want = torch.autograd.grad((expected * expected).sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_torch_export():
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16), torch.randn(9, 11))
    exported = torch.export.export(Attention(), args)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.sfa.flash_sfa.default in targets
    torch.testing.assert_close(exported.module()(*args), Attention()(*args))


def test_registered_once_under_the_sfa_namespace():
    assert sfa_compile.kernels.ops.flash_sfa_op._qualname == "sfa::flash_sfa"
    assert hasattr(torch.ops.sfa, "flash_sfa") and hasattr(torch.ops.sfa, "flash_sfa_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # SDPA's CPU flash engine; the reference
@pytest.mark.parametrize("shapes", [((2, 4, 9, 16), (2, 2, 11, 16)), ((1, 1, 9, 16), (1, 1, 9, 16)), ((3, 9, 16),) * 2])
def test_backward_fake_declares_the_real_gradient_layout(dtype, shapes):
    """The backward op's fake gives its outputs the real strides on each CPU engine (Inductor relies on them);
    4-D gradients of SDPA's CPU flash engine keep that engine's layout, SDPA's own (no copy)."""
    (q_shape, k_shape), g = shapes, torch.Generator().manual_seed(0)
    q = torch.randn(q_shape, generator=g, dtype=dtype)
    k, v = (torch.randn(k_shape, generator=g, dtype=dtype) for _ in range(2))
    gqa = q.size(-3) != k.size(-3)
    out, lse, q_sparse, k_sparse = torch.ops.sfa.flash_sfa(q, k, v, 5, enable_gqa=gqa)
    args = (torch.randn(out.shape, generator=g, dtype=dtype), q_sparse, k_sparse, v, out, lse, 5, None, 0.0, False,
            None, gqa, None, False, list(q_shape), list(k_shape))
    torch.library.opcheck(torch.ops.sfa.flash_sfa_backward.default, args)
    real = torch.ops.sfa.flash_sfa_backward(*args)[:3]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.sfa.flash_sfa_backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args))[:3]
    assert [t.stride() for t in real] == [t.stride() for t in fake]
    if dtype == torch.float32 and len(q_shape) == 4:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        sdpa = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(*leaves, enable_gqa=gqa),
                                   leaves, args[0])
        assert [t.stride() for t in real] == [t.stride() for t in sdpa]
