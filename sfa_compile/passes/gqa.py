"""Recognize key/value heads repeated for grouped-query attention, so the op can read them once.

Matches Hugging Face's ``repeat_kv`` (x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)) and
``repeat_interleave(x, n, dim=1)``; both give query head i the key head i // n, the order ``enable_gqa``
uses. Not finding one is only slower: the repeated tensor is still correct input.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .graph_utils import arg, example, is_function, is_method, static_int


def _unsqueezed_at_2(node) -> Optional[fx.Node]:
    if is_method(node, "unsqueeze") or is_function(node, {torch.unsqueeze}):
        return node.args[0] if arg(node, 1, "dim") == 2 else None
    if is_function(node, {operator.getitem}):
        index = node.args[1]
        if isinstance(index, tuple) and len(index) == 5 and index[2] is None and all(
                isinstance(i, slice) and i == slice(None) for j, i in enumerate(index) if j != 2):
            return node.args[0]
    return None


def peel_repeated_heads(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(base, n_rep) if ``node`` is a 4-D head repetition of ``base`` along dim 1, else None."""
    out, base = example(node), None
    if is_method(node, "repeat_interleave") or is_function(node, {torch.repeat_interleave}):
        if arg(node, 2, "dim") in (1, -3) and static_int(arg(node, 1, "repeats")):
            base = node.args[0]
    elif is_method(node, "reshape", "view") or is_function(node, {torch.reshape}):
        expanded = node.args[0]
        if is_method(expanded, "expand"):
            base = _unsqueezed_at_2(expanded.args[0])
    src = example(base)
    if src is None or out is None or src.dim() != 4 or out.dim() != 4:
        return None
    heads, rep_heads = static_int(src.size(1)), static_int(out.size(1))
    if not heads or not rep_heads or rep_heads % heads:
        return None
    n_rep = rep_heads // heads
    # Only the heads may grow: an expand of another size-1 dim (a length-1 key repeated along its length, say)
    # keeps the head count and must not be read as a repetition of heads.
    if tuple(out.shape) != (src.size(0), rep_heads, src.size(2), src.size(3)):
        return None
    if base is not node.args[0]:  # expand + reshape: the expand must add exactly the repeat dim at position 2
        expanded = example(node.args[0])
        if expanded is None or tuple(expanded.shape) != (src.size(0), heads, n_rep, src.size(2), src.size(3)):
            return None
    return base, n_rep
