"""The op calls the pass pipeline leaves in a function's Dynamo graph, for tests that read their arguments."""

import torch

import sfa_compile
from sfa_compile.passes.pipeline import run_pipeline


def flash_sfa_calls(fn, *args, topk: int) -> list:
    """The ``sfa::flash_sfa`` nodes of ``fn``'s graph after the pipeline ran at ``topk``."""
    graphs = []

    def capture(gm, example_inputs):
        run_pipeline(gm, sfa_compile.SFAConfig(topk=topk))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args)
    return [n for n in graphs[0].graph.nodes if n.target is torch.ops.sfa.flash_sfa.default]
