"""Pass: find calls of scaled_dot_product_attention (pattern "sdpa_call").

Matches ``torch._C._nn.scaled_dot_product_attention`` / ``F.scaled_dot_product_attention`` with every
argument (attn_mask, dropout_p, is_causal, scale, enable_gqa), as Hugging Face's "sdpa" attention and
most hand-tuned models call it. Refuses non-constant dropout/causal/scale arguments (their values must
be known to emit the op) and attention with no head dim to read.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import arg, constant_value, example, is_function, module_path, static_int
from .match import AttentionMatch, Refusal

PATTERN = "sdpa_call"
SDPA_FUNCTIONS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}


def _match(node: fx.Node) -> Union[AttentionMatch, Refusal]:
    path = module_path(node)
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout_p = constant_value(arg(node, 4, "dropout_p", 0.0))
    is_causal = arg(node, 5, "is_causal", False)
    scale_arg = arg(node, 6, "scale")
    scale = None if scale_arg is None else constant_value(scale_arg)
    enable_gqa = arg(node, 7, "enable_gqa", False)
    if dropout_p is None or not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return Refusal(PATTERN, path, node, "dropout_p, is_causal and enable_gqa must be constants")
    if scale_arg is not None and scale is None:
        return Refusal(PATTERN, path, node, "scale is not a constant")
    qv = example(q)
    if qv is None or static_int(qv.size(-1)) is None:
        return Refusal(PATTERN, path, node, "head dim is not static")
    return AttentionMatch(
        pattern=PATTERN, module_path=path, output=node, query=q, key=k, value=v, mask=mask,
        dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, removable=(node,),
    )


def find_sdpa_calls(gm: fx.GraphModule) -> list:
    return [_match(n) for n in gm.graph.nodes if is_function(n, SDPA_FUNCTIONS)]
