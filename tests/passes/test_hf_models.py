"""The backend on real model code: tiny Hugging Face models, eager and sdpa attention."""

import pytest
import torch
from hf_models import CASES, bloom_reference_copy, build, reference_copy

import sfa_compile


def _plain_graph_count(model, inputs) -> int:
    """Graphs Dynamo makes of the model with a do-nothing backend (some transformers versions break graphs
    inside model code; the sfa backend must not add any)."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=count, dynamic=False)(**inputs)
    return len(graphs)


def _outputs(out):
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state


@pytest.mark.parametrize("name, impl", CASES)
def test_every_site_rewritten_and_exact(name, impl):
    model, inputs, sites, head_dim = build(name, impl)
    model.eval()
    torch._dynamo.reset()
    report = sfa_compile.explain(model, **inputs, sfa_config=sfa_compile.SFAConfig(topk=head_dim))
    assert [s.rewritten for s in report.sites] == [True] * sites, report.table()
    assert report.graphs == _plain_graph_count(model, inputs)
    modules = dict(model.named_modules())  # each site is named by the model's own module path
    assert all(s.module_path in modules and s.module_path for s in report.sites), report.table()
    torch._dynamo.reset()
    with torch.no_grad():
        dense = _outputs(model(**inputs))
        # (a) topk = head dim: the rewritten model is the original model.
        same = torch.compile(model, backend="sfa", options={"topk": head_dim, "handoff": "aot_eager"})
        torch.testing.assert_close(_outputs(same(**inputs)), dense, rtol=1e-4, atol=1e-5)
        # (b) topk < head dim: equal to the model with each attention computed eagerly by flash_sfa.
        torch._dynamo.reset()
        topk = head_dim // 4
        sparse = torch.compile(model, backend="sfa", options={"topk": topk, "handoff": "aot_eager"})
        got = _outputs(sparse(**inputs))
        want = _outputs(reference_copy(model, topk)(**inputs))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - dense).abs().max() > 1e-5, "topk < head dim must change the output"


def test_falcon_eager_scales_scores_in_place():
    """Falcon's eager attention scales its scores in place (``scores /= math.sqrt(d)``; it uses no attention
    interface, so ``reference_copy`` cannot serve): every site rewritten, exact at topk = head dim, and at topk <
    head dim equal to its sdpa attention rewritten (the SDPA-call finder: another path to the same SFA)."""
    transformers = pytest.importorskip("transformers")
    falcon = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = transformers.FalconConfig(vocab_size=100, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                           new_decoder_architecture=True, num_kv_heads=1, attn_implementation=impl)
        falcon[impl] = transformers.FalconForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    report = sfa_compile.explain(falcon["eager"], input_ids=ids, sfa_config=sfa_compile.SFAConfig(topk=16))
    assert [s.rewritten for s in report.sites] == [True, True], report.table()
    with torch.no_grad():
        dense = falcon["eager"](input_ids=ids).logits
        torch._dynamo.reset()
        same = torch.compile(falcon["eager"], backend="sfa", options={"topk": 16, "handoff": "aot_eager"})
        torch.testing.assert_close(same(input_ids=ids).logits, dense, rtol=1e-4, atol=1e-5)
        sparse = {}
        for impl, model in falcon.items():
            torch._dynamo.reset()
            sparse[impl] = torch.compile(model, backend="sfa", options={"topk": 4, "handoff": "aot_eager"})(
                input_ids=ids).logits
    torch.testing.assert_close(sparse["eager"], sparse["sdpa"], rtol=1e-4, atol=1e-5)
    assert (sparse["eager"] - dense).abs().max() > 1e-4, "topk < head dim must change the output"


def test_bloom_alibi_through_baddbmm_and_views():
    """Bloom (no attention interface, so no reference copy): scores from baddbmm(alibi, q, k^T) in (B*H) batch
    dims, viewed to (B, H) to add the mask, viewed back for bmm with v. Rewritten, exact at topk = head dim, and
    at smaller topk equal to Bloom's attention computed by flash_sfa."""
    model, inputs, sites, head_dim = build("bloom", "eager")
    model.eval()
    torch._dynamo.reset()
    report = sfa_compile.explain(model, **inputs, sfa_config=sfa_compile.SFAConfig(topk=head_dim))
    assert [s.rewritten for s in report.sites] == [True] * sites, report.table()
    with torch.no_grad():
        dense = model(**inputs).logits
        torch._dynamo.reset()
        same = torch.compile(model, backend="sfa", options={"topk": head_dim, "handoff": "aot_eager"})
        torch.testing.assert_close(same(**inputs).logits, dense, rtol=1e-4, atol=1e-5)
        torch._dynamo.reset()
        sparse = torch.compile(model, backend="sfa", options={"topk": 4, "handoff": "aot_eager"})(**inputs).logits
        torch.testing.assert_close(bloom_reference_copy(model, head_dim)(**inputs).logits, dense, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse, bloom_reference_copy(model, 4)(**inputs).logits, rtol=1e-4, atol=1e-5)
        assert (sparse - dense).abs().max() > 1e-5, "topk < head dim must change the output"


def test_gemma2_soft_capping_stays_dense_and_exact():
    model, inputs, sites, head_dim = build("gemma2_softcap", "eager")
    model.eval()
    torch._dynamo.reset()
    report = sfa_compile.explain(model, **inputs, sfa_config=sfa_compile.SFAConfig(topk=4))
    assert [(s.rewritten, "soft-capping" in s.reason) for s in report.sites] == [(False, True)] * sites, report.table()
    with torch.no_grad():
        torch._dynamo.reset()
        got = torch.compile(model, backend="sfa", options={"topk": 4})(**inputs).logits
        torch.testing.assert_close(got, model(**inputs).logits, rtol=1e-4, atol=1e-5)
