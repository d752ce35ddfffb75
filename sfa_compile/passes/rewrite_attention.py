"""Pass: rewrite each AttentionMatch into one ``sfa::flash_sfa`` call.

Emits, before the matched output: the mask in SDPA form (additive terms summed, boolean keep terms
combined, -inf where a keep term is False), repeated K/V heads undone into ``enable_gqa``, the op call
and its first output (the second, the log-sum-exp, serves the backward), and a dtype cast when the
matched subgraph produced another dtype. Then erases the old subgraph. Refuses (returns a reason) when
topk exceeds the site's head dim, or when a step of the new subgraph fails on the fake values.

``replace_site`` is the shared procedure; rewrite_to_module.py emits a submodule call in place of the op.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx

from .gqa import peel_repeated_heads
from .graph_utils import example
from .match import AttentionMatch, MaskParts, MaskTerm


def fake_value(node: fx.Node, fake_mode) -> None:
    """Record the output's fake value on a new node, as Dynamo does, for passes that read it."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value"))
    with fake_mode:
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value


def _emit(graph: fx.Graph, fake_mode, op: str, target, *args, **kwargs) -> fx.Node:
    node = graph.create_node(op, target, args, kwargs)
    fake_value(node, fake_mode)
    return node


def _regroup(graph, fake_mode, node: fx.Node, old: tuple, new: tuple) -> fx.Node:
    """``node`` with its leading dims ``old`` regrouped into ``new`` (same element count, row-major order, as
    the view it undoes or repeats); the last two dims stay as they are, static or not."""
    if tuple(old) == tuple(new):
        return node
    if not old or not new:
        raise ValueError("a value with no batch dims cannot be regrouped")
    flat = _emit(graph, fake_mode, "call_method", "flatten", node, 0, len(old) - 1)
    return _emit(graph, fake_mode, "call_method", "unflatten", flat, 0, tuple(new))


def _in_space(graph, fake_mode, term: MaskTerm, space: Optional[tuple]) -> fx.Node:
    """A mask term moved from the leading shape where it was applied to ``space``: broadcast over the old
    batch dims first (a term may have fewer or size-1 batch dims), then regrouped as the scores were."""
    if space is None or term.space == space:
        return term.node
    value = example(term.node)
    if value.dim() < 2:
        raise ValueError("a mask of fewer than 2 dims applied to regrouped scores")
    full = term.node
    if tuple(value.shape[:-2]) != tuple(term.space):
        full = _emit(graph, fake_mode, "call_method", "expand", term.node, *term.space, -1, -1)
    return _regroup(graph, fake_mode, full, term.space, space)


def _mask_node(graph, fake_mode, mask, query_dtype, space: Optional[tuple]) -> Optional[fx.Node]:
    """The site's mask as the op takes it. Keep terms filled with -inf combine into one boolean mask; a finite
    fill (a dtype minimum) becomes an additive term holding that value, so a row whose keys are all masked
    mixes all values uniformly, as eager mode does, instead of returning zeros."""
    if not isinstance(mask, MaskParts):
        return mask
    keep = None
    additive_terms = [_in_space(graph, fake_mode, term, space) for term in mask.additive]
    for term in mask.keep:
        cond = _in_space(graph, fake_mode, term, space)
        if term.fill != float("-inf"):
            values = (term.fill, 0.0) if term.negate else (0.0, term.fill)
            additive_terms.append(_emit(graph, fake_mode, "call_function", torch.where, cond, *values))
            continue
        term_keep = _emit(graph, fake_mode, "call_function", operator.invert, cond) if term.negate else cond
        keep = term_keep if keep is None else _emit(graph, fake_mode, "call_function", operator.and_, keep, term_keep)
    additive = None
    for node in additive_terms:
        if example(node).dtype not in (torch.float32, query_dtype):
            node = _emit(graph, fake_mode, "call_method", "to", node, torch.float32)
        additive = node if additive is None else _emit(graph, fake_mode, "call_function", operator.add, additive, node)
    if additive is None:
        return keep
    if keep is not None:
        dropped = _emit(graph, fake_mode, "call_function", operator.invert, keep)
        additive = _emit(graph, fake_mode, "call_method", "masked_fill", additive, dropped, float("-inf"))
    return additive


def _undo_head_repeat(match: AttentionMatch) -> tuple[fx.Node, fx.Node, bool]:
    if match.enable_gqa or match.space is not None:  # already GQA, or regrouped heads: nothing to peel
        return match.key, match.value, match.enable_gqa
    k_peeled, v_peeled = peel_repeated_heads(match.key), peel_repeated_heads(match.value)
    if k_peeled and v_peeled and k_peeled[1] == v_peeled[1]:
        return k_peeled[0], v_peeled[0], True
    return match.key, match.value, False


class SiteRefused(Exception):
    """Raised while emitting a site: it stays dense, with this reason."""


def replace_site(gm: fx.GraphModule, match: AttentionMatch, topk: int, emit_call: Callable) -> Optional[str]:
    """Replace one site by what ``emit_call(graph, fake_mode, match, args)`` emits for the op's arguments
    ``args`` = (query, key, value, topk, mask, dropout_p, is_causal, scale, enable_gqa); returns None on success or
    the reason it refused. Nothing of the old subgraph changes until the new one is built: a step that fails
    leaves only dead nodes behind."""
    q_value = example(match.query)
    head_dim = q_value.size(-1)
    if topk > head_dim:  # a symbolic head dim: Dynamo guards on this comparison, so another size recompiles
        return f"topk {topk} exceeds the head dim" + (f" {head_dim}" if isinstance(head_dim, int) else "")
    graph, fake_mode = gm.graph, q_value.fake_mode
    key, value, enable_gqa = _undo_head_repeat(match)
    try:
        with graph.inserting_before(match.output):
            out = _emit_site(graph, fake_mode, match, key, value, enable_gqa, topk, emit_call)
    except SiteRefused as err:
        return str(err)
    except Exception as err:  # the fake run rejected an emitted step: the site stays dense, and says why
        return f"could not emit the op here ({type(err).__name__}: {err})"
    out.meta["nn_module_stack"] = match.output.meta.get("nn_module_stack", {})
    match.output.replace_all_uses_with(out)
    for node in reversed(match.removable):
        if not node.users:
            graph.erase_node(node)
    return None


def _scale_arg(graph, fake_mode, match: AttentionMatch):
    """The op's scale: the site's constant, times or divided by each traced float factor in the graph (a Python
    float product at run time, as the constants were folded)."""
    scale = match.scale
    for factor, divide in match.traced_scale:
        if not divide and isinstance(scale, float) and scale == 1.0:
            scale = factor
        else:
            combine = operator.truediv if divide else operator.mul
            scale = _emit(graph, fake_mode, "call_function", combine, scale, factor)
    return scale


def _emit_site(graph, fake_mode, match: AttentionMatch, key, value, enable_gqa, topk, emit_call):
    query = match.query
    if match.space is not None:
        query, key, value = (_regroup(graph, fake_mode, n, tuple(example(n).shape[:-2]), match.space)
                             for n in (query, key, value))
    mask = _mask_node(graph, fake_mode, match.mask, example(query).dtype, match.space)
    scale = _scale_arg(graph, fake_mode, match)
    args = (query, key, value, topk, mask, match.dropout_p, match.is_causal, scale, enable_gqa)
    out = emit_call(graph, fake_mode, match, args)
    expected = example(match.output)
    if match.space is not None:
        out = _regroup(graph, fake_mode, out, match.space, tuple(expected.shape[:-2]))
    if expected.dtype != example(out).dtype:
        out = _emit(graph, fake_mode, "call_method", "to", out, expected.dtype)
    if tuple(example(out).shape) != tuple(expected.shape):
        raise SiteRefused(f"the op's output would be {tuple(example(out).shape)}, the site's is "
                          f"{tuple(expected.shape)}")
    return out


def _op_call(graph, fake_mode, match: AttentionMatch, args: tuple) -> fx.Node:
    seed = None
    if match.dropout_p > 0.0:  # the op's dropout draws from this seed, drawn where the model's dropout was
        seed = _emit(graph, fake_mode, "call_function", torch.randint, 0, 2**62, (), dtype=torch.int64)
    call = _emit(graph, fake_mode, "call_function", torch.ops.sfa.flash_sfa.default, *args, seed)
    return _emit(graph, fake_mode, "call_function", operator.getitem, call, 0)


def rewrite_attention(gm: fx.GraphModule, match: AttentionMatch, topk: int) -> Optional[str]:
    """Replace one site by sfa::flash_sfa; returns None on success or the reason it refused."""
    return replace_site(gm, match, topk, _op_call)
