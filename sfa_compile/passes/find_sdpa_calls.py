"""Pass: find calls of scaled_dot_product_attention (pattern "sdpa_call").

Matches ``torch._C._nn.scaled_dot_product_attention`` / ``F.scaled_dot_product_attention`` with every
argument (attn_mask, dropout_p, is_causal, scale, enable_gqa), as Hugging Face's "sdpa" attention and
most hand-tuned models call it. Under ``torch.compile(dynamic=True)`` a float Dynamo traced as a graph value
(a module attribute) may be the scale, handed to the op as that same value, or dropout_p, read under a guard.
Refuses other non-constant dropout_p, is_causal, enable_gqa and scale arguments (their values must be known
to emit the op).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .constants import constant_value, guarded_float, traced_float
from .graph_utils import example, is_function, module_path, same_batch
from .match import AttentionMatch, Refusal
from .signatures import bind

PATTERN = "sdpa_call"
SDPA_FUNCTIONS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}


def _match(node: fx.Node) -> Union[AttentionMatch, Refusal]:
    path = module_path(node)
    args = bind(node)
    if args is None:
        return Refusal(PATTERN, path, node, "scaled_dot_product_attention called with arguments it does not take")
    q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
    dropout_p = constant_value(guarded_float(args["dropout_p"]))
    is_causal, enable_gqa = args["is_causal"], args["enable_gqa"]
    scale = None if args["scale"] is None else constant_value(args["scale"])
    traced = traced_float(args["scale"])  # the op is handed the same graph value: the float SDPA would get
    if dropout_p is None or not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return Refusal(PATTERN, path, node, "dropout_p, is_causal and enable_gqa must be constants")
    if args["scale"] is not None and scale is None and traced is None:
        return Refusal(PATTERN, path, node, "scale is neither a finite constant nor a traced float")
    values = [example(t) for t in (q, k, v)]
    if any(t is None or not t.is_floating_point() for t in values):
        return Refusal(PATTERN, path, node, "query, key and value must be floating tensors")
    if not same_batch(*values, gqa=enable_gqa):
        return Refusal(PATTERN, path, node, "query, key and value have different batch dims (broadcast)")
    return AttentionMatch(
        pattern=PATTERN, module_path=path, output=node, query=q, key=k, value=v, mask=mask,
        dropout_p=dropout_p, is_causal=is_causal, scale=1.0 if traced is not None else scale,
        traced_scale=() if traced is None else ((traced, False),), enable_gqa=enable_gqa, removable=(node,),
    )


def _match_or_refuse(node: fx.Node) -> Union[AttentionMatch, Refusal]:
    try:
        return _match(node)
    except Exception as err:  # a call this matcher did not foresee: refuse it, never fail the compile
        return Refusal(PATTERN, module_path(node), node, f"could not analyze ({type(err).__name__}: {err})")


def find_sdpa_calls(gm: fx.GraphModule) -> list:
    return [_match_or_refuse(n) for n in gm.graph.nodes if is_function(n, SDPA_FUNCTIONS)]
