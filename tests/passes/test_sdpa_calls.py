"""SDPA calls with every argument become one sfa::flash_sfa call carrying the same arguments."""

import pytest
import torch
import torch.nn.functional as F
from sfa_oracle import oracle_sfa

import sfa_compile
from sfa_compile.passes.pipeline import run_pipeline


def _rewritten_graph(fn, *args):
    graphs = []

    def capture(gm, example_inputs):
        run_pipeline(gm, sfa_compile.SFAConfig(topk=3))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=capture, fullgraph=True)(*args)
    (gm,) = graphs
    return out, [n for n in gm.graph.nodes if n.target is torch.ops.sfa.flash_sfa.default]


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_all_arguments_carried(mask_kind):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.3 if mask_kind == "bool" else torch.randn(5, 7, generator=g)

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.4, enable_gqa=True)

    out, calls = _rewritten_graph(fn, q, k, v, mask)
    assert len(calls) == 1
    _, _, _, topk, m, p, causal, scale, gqa, seed = calls[0].args
    assert (topk, p, causal, scale, gqa, seed) == (3, 0.0, False, 0.4, True, None) and m is not None
    torch.testing.assert_close(out, oracle_sfa(q, k, v, 3, attn_mask=mask, scale=0.4, enable_gqa=True).float())


def test_dropout_and_causal_carried():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)  # noqa: E731
    _, calls = _rewritten_graph(fn, q, k, v)
    _, _, _, _, m, p, causal, scale, gqa, seed = calls[0].args
    assert (m, p, causal, scale, gqa) == (None, 0.1, True, None, False) and seed is not None
