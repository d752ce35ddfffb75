"""Pass: rewrite each AttentionMatch into a call of an SFA attention submodule (offline conversion of plain
modules, conversion/modules.py).

Emits what rewrite_attention.py emits (mask, GQA, views, casts) around a call of the submodule that
``make_site(match, query, key)`` (fake values) adds to the graph module and names: an SFAAttention that owns the
site's projection R and takes SDPA's arguments. Refuses when ``make_site`` returns None, and wherever
rewrite_attention.py refuses.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.fx as fx

from .graph_utils import example
from .match import AttentionMatch
from .rewrite_attention import SiteRefused, replace_site


def rewrite_to_module(gm: fx.GraphModule, match: AttentionMatch, topk: int, make_site: Callable) -> Optional[str]:
    """Replace one site by a call of the submodule ``make_site`` adds; None on success, else the reason."""

    def module_call(graph: fx.Graph, fake_mode, match: AttentionMatch, args: tuple) -> fx.Node:
        query, key, value, _, mask, dropout_p, is_causal, scale, enable_gqa = args
        site = make_site(match, example(query), example(key))
        if site is None:
            raise SiteRefused("conversion needs 3-D or 4-D query and key of the same rank")
        # The default scale is written out: the site's head dim is static, an exporter may not see it so.
        scale = scale if scale is not None else 1.0 / math.sqrt(example(query).size(-1))
        out = graph.call_module(site, (query, key, value), dict(attn_mask=mask, dropout_p=dropout_p,
                                                                 is_causal=is_causal, scale=scale,
                                                                 enable_gqa=enable_gqa))
        fake_args = torch.fx.node.map_arg(args, lambda n: n.meta.get("example_value"))
        with fake_mode:
            out.meta["example_value"] = torch.ops.sfa.flash_sfa.default(*fake_args, None)[0]
        return out

    return replace_site(gm, match, topk, module_call)
