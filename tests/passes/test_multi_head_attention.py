"""PyTorch's own attention modules: nn.MultiheadAttention and the nn.Transformer layers call
F.multi_head_attention_forward, which Dynamo keeps opaque; the expansion pass must open it exactly."""

from functools import partial

import pytest
import torch
import torch.nn as nn

import sfa_compile

E, H = 16, 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    x, mem = torch.randn(2, 5, E, generator=g), torch.randn(2, 7, E, generator=g)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    return x, mem, kpm


def _call(module, query, memory, **kwargs):
    return module(query, memory, memory, **kwargs)[0]


def _cases():
    torch.manual_seed(0)
    x, mem, kpm = _inputs()
    causal_bool = torch.ones(5, 7, dtype=torch.bool).triu(1)
    cases = {}
    for batch_first in (True, False):
        m = nn.MultiheadAttention(E, H, batch_first=batch_first)
        xx, mm = (x, mem) if batch_first else (x.transpose(0, 1), mem.transpose(0, 1))
        cases[f"mha batch_first={batch_first}"] = partial(_call, m, xx, mm, need_weights=False)
        cases[f"mha key_padding_mask batch_first={batch_first}"] = partial(_call, m, xx, mm, key_padding_mask=kpm,
                                                                            need_weights=False)
        cases[f"mha bool attn_mask, weights unused, batch_first={batch_first}"] = partial(_call, m, xx, mm,
                                                                                          attn_mask=causal_bool)
    other = nn.MultiheadAttention(E, H, batch_first=True, kdim=8, vdim=12)
    k8, v12 = torch.randn(2, 7, 8), torch.randn(2, 7, 12)
    cases["mha kdim vdim"] = lambda: other(x, k8, v12, need_weights=False)[0]
    enc = nn.TransformerEncoderLayer(E, H, 32, batch_first=True, dropout=0.0)
    dec = nn.TransformerDecoderLayer(E, H, 32, batch_first=True, dropout=0.0)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    cases["encoder layer"] = lambda: enc(x, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    cases["decoder layer, causal hint"] = lambda: dec(x, mem, tgt_mask=tgt_mask, tgt_is_causal=True,
                                                      memory_key_padding_mask=kpm)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_expanded_and_rewritten_exactly(name):
    fn = CASES[name]
    torch._dynamo.reset()
    report = sfa_compile.explain(fn, sfa_config=sfa_compile.SFAConfig(topk=E // H))
    assert report.sites and all(s.rewritten for s in report.sites), report.table()
    torch._dynamo.reset()
    got = torch.compile(fn, backend="sfa", options={"topk": E // H, "handoff": "aot_eager"})()
    torch.testing.assert_close(got, fn(), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    sparse = torch.compile(fn, backend="sfa", options={"topk": 2, "handoff": "aot_eager"})()
    assert (sparse - fn()).abs().max() > 1e-4, "topk < head dim must change the output"


def test_attention_weights_used_stays_dense():
    m = nn.MultiheadAttention(E, H, batch_first=True)
    x, _, _ = _inputs()
    fn = lambda: m(x, x, x)[1]  # noqa: E731
    torch._dynamo.reset()
    report = sfa_compile.explain(fn, sfa_config=sfa_compile.SFAConfig(topk=2))
    assert [(s.rewritten, "weights are used" in s.reason) for s in report.sites] == [(False, True)], report.table()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="sfa", options={"topk": 2})(), fn())


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("mask", ["none", "padding", "both", "float padding of -1"])
def test_encoder_layer_inference_fast_path_expanded_exactly(norm_first, activation, mask):
    """eval + no_grad: nn.TransformerEncoderLayer calls torch._transformer_encoder_layer_fwd (the whole layer)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, batch_first=True, norm_first=norm_first,
                                       activation=activation).eval()
    x, _, _ = _inputs()
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    kwargs = {"none": {}, "padding": {"src_key_padding_mask": padding},
              "both": {"src_key_padding_mask": padding, "src_mask": torch.ones(5, 5, dtype=torch.bool).triu(1)},
              # the fast path masks every nonzero entry (here unlike the layer's training path, which adds -1)
              "float padding of -1": {"src_key_padding_mask": torch.zeros(2, 5).masked_fill(padding, -1.0)}}[mask]
    fn = lambda: layer(x, **kwargs)  # noqa: E731
    with torch.no_grad():
        torch._dynamo.reset()
        graphs = []
        torch.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward)()
        assert any(n.target is torch._transformer_encoder_layer_fwd for n in graphs[0].graph.nodes)
        torch._dynamo.reset()
        report = sfa_compile.explain(fn, sfa_config=sfa_compile.SFAConfig(topk=E // H))
        assert [s.rewritten for s in report.sites] == [True], report.table()
        torch._dynamo.reset()
        got = torch.compile(fn, backend="sfa", options={"topk": E // H, "handoff": "aot_eager"})()
        torch.testing.assert_close(got, fn(), rtol=1e-5, atol=1e-5)
