"""Copy a traced PyTorch function into a Dynamo graph, as a lowering pass needs to open an opaque call."""

from __future__ import annotations

from typing import Callable, Union

import torch.fx as fx

from .graph_utils import module_path
from .match import Refusal
from .rewrite_attention import fake_value


def inline_function(gm: fx.GraphModule, node: fx.Node, function: Callable, inputs: list, fake_mode) -> fx.Node:
    """Trace ``function`` with torch.fx (its Python control flow decided by constants only), copy the graph in
    before ``node`` with the placeholders bound to ``inputs`` in order, and record on every new node its fake
    value and ``node``'s module stack (the finders read both). Returns the value the function returns."""
    traced = fx.symbolic_trace(function)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"{len(placeholders)} parameters, {len(inputs)} inputs")
    env = dict(zip(placeholders, inputs))
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(traced.graph, env)
    stack = node.meta.get("nn_module_stack", {})
    for old, new in env.items():
        if old.op != "placeholder" and isinstance(new, fx.Node):
            new.meta["nn_module_stack"] = stack
            fake_value(new, fake_mode)
    return out


def expand_calls(gm: fx.GraphModule, target, pattern: str, label: str,
                 plan: Callable[[fx.Node], Union[str, tuple]], replace: Callable[[fx.Node, fx.Node], None]) -> list:
    """Expand every call of ``target``: ``plan(node)`` gives the reason to leave it as it is, or (function, inputs,
    fake mode) to inline in its place; ``replace(node, out)`` hands the call's users to the expansion and erases
    it. Returns a Refusal (pattern, "label: reason") for each call left as it is."""
    refusals = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        planned = plan(node)
        if isinstance(planned, str):
            refusals.append(Refusal(pattern, module_path(node), node, f"{label}: {planned}"))
            continue
        try:
            out = inline_function(gm, node, *planned)
        except Exception as err:  # nothing reads the copied nodes yet: they are dead code, and the call stays
            refusals.append(Refusal(pattern, module_path(node), node,
                                    f"{label}: could not expand ({type(err).__name__}: {err})"))
            continue
        replace(node, out)
    return refusals
