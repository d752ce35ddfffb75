"""Copy a traced PyTorch function into a Dynamo graph, as a lowering pass needs to open an opaque call."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

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
