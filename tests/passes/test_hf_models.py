"""The backend on real model code: tiny Hugging Face models, eager and sdpa attention."""

import pytest
import torch

import sfa_compile
from hf_models import MODELS, build, reference_copy


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


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_every_site_rewritten_and_exact(name, impl):
    model, inputs, sites, head_dim = build(name, impl)
    model.eval()
    report = sfa_compile.explain(model, **inputs, sfa_config=sfa_compile.SFAConfig(topk=head_dim))
    assert [s.rewritten for s in report.sites] == [True] * sites, report.table()
    assert report.graphs == _plain_graph_count(model, inputs)
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
        assert (got - dense).abs().max() > 1e-4, "topk < head dim must change the output"
