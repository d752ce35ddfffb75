"""Pass: find hand-written attention, softmax(mask(scale * q @ k^T)) @ v, anchored on each softmax.

Matches (pattern "matmul_softmax_matmul", the form of Hugging Face eager attention, GPT-2, BERT, ViT,
Whisper, T5, Bloom, Falcon): q @ k^T and p @ v as products.py proves them; between them the score chain of
score_chain.py (constant or traced-float scales, additive and boolean masks, floating casts, batch-dim views);
softmax over the last dim; then floating casts, dropout (p constant, or a traced float read under a guard) and
batch-dim views up to probabilities @ v.

Refuses (returns a Refusal, graph untouched): softmax over another dim or with no dim given; scores or
probabilities with other users (e.g. attention weights returned) or filling two roles; q, k, v that are not
floating tensors of one dtype; views whose sizes are not static; everything score_chain.py refuses. A wrong
rewrite is silent corruption, a missed one is only slower.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.fx as fx

from .constants import constant_value, guarded_float
from .graph_utils import (
    DROPOUT_FUNCTIONS,
    SOFTMAX_FUNCTIONS,
    example,
    is_function,
    is_method,
    may_mutate,
    module_path,
    same_batch,
    sole_consumer,
    static_int,
)
from .match import AttentionMatch, Refusal
from .products import pv_value, qk_product
from .score_chain import Refuse, ScoreChain, identity_source, leading, view_source
from .signatures import bind

PATTERN = "matmul_softmax_matmul"


def _is_softmax(node: fx.Node) -> bool:
    return is_function(node, SOFTMAX_FUNCTIONS) or is_method(node, "softmax")


def _softmax_input(softmax: fx.Node) -> fx.Node:
    """The scores a softmax over their last dim takes; refuses any other softmax."""
    args = bind(softmax)
    if args is None:
        raise Refuse("softmax called with arguments it does not take")
    scores, dim, dtype = args["input"], args["dim"], args["dtype"]
    value = example(scores)
    if value is None or not value.is_floating_point():
        raise Refuse("softmax of a value that is not a floating tensor")
    if dim is None:
        raise Refuse("softmax with no dim (the implicit, deprecated choice)")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -value.dim() <= dim < value.dim() or \
            dim % value.dim() != value.dim() - 1:
        raise Refuse(f"softmax over dim {dim}, not the key dim")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise Refuse(f"softmax with dtype {dtype}")
    if dtype is not None and torch.finfo(dtype).max < torch.finfo(value.dtype).max:
        raise Refuse(f"softmax in {dtype} narrows the scores, which may overflow where the op would not")
    return scores


def _dropout(node: fx.Node, probs: fx.Node) -> float:
    """The probability the dropout ``node`` applies to ``probs`` (0 when not training); refuses in-place or
    non-constant dropout, and dropout of another value."""
    args = bind(node)
    if args is None:
        raise Refuse("dropout called with arguments it does not take")
    if args["input"] is not probs:
        raise Refuse("dropout of something else than the probabilities")
    if args.get("inplace", False) is not False:
        raise Refuse("in-place dropout on the probabilities")
    training = args.get("training", args.get("train"))
    if training is False:  # p is then never read: not even a traced float's value is needed
        return 0.0
    p = constant_value(guarded_float(args["p"]))
    if p is None or training is not True:
        raise Refuse("dropout with a non-constant p or training flag")
    if not 0.0 <= p < 1.0:
        raise Refuse(f"dropout with p={p}")
    return p


def _forward_chain(softmax: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, float, list, bool]:
    """From the softmax to probs @ v: (pv node, probabilities it takes, v, dropout_p, chain nodes, views)."""
    node, dropout_p, nodes, views = softmax, 0.0, [softmax], False
    while True:
        user = sole_consumer(node)
        if user is None:
            raise Refuse(f"attention probabilities ({node.name}) have other users, e.g. returned attention weights")
        if identity_source(user) is node:
            pass
        elif view_source(user) is node:
            views = True
        elif is_function(user, DROPOUT_FUNCTIONS) or is_method(user, "dropout"):
            dropout_p = _dropout(user, node)
        else:
            v = pv_value(user, node)
            if v is None:
                raise Refuse(f"probabilities feed {getattr(user.target, '__name__', user.target)}, not @ v")
            nodes.append(user)
            return user, node, v, dropout_p, nodes, views
        node = user
        nodes.append(node)


def _static(shape: tuple) -> bool:
    return all(static_int(s) is not None for s in shape)


def _check_space(chain: ScoreChain, softmax: fx.Node, qk: fx.Node, q, k, probs, v) -> Optional[tuple]:
    """The leading shape to run the op in when views regroup the batch dims (None when there are none).
    q, k and v must then fill their product's batch dims without broadcasting."""
    space = leading(softmax)
    if not any(term.space != space for term in chain.mask.additive + chain.mask.keep) and \
            not chain.views and leading(qk) == space and leading(probs) == space:
        return None
    shapes = [space, leading(qk), leading(probs)] + [term.space for term in chain.mask.additive + chain.mask.keep]
    if not all(_static(s) for s in shapes):
        raise Refuse("views of the scores with sizes that are not static")
    if leading(q) != leading(qk) or leading(k) != leading(qk) or leading(v) != leading(probs):
        raise Refuse("q, k or v broadcast in a product whose scores are viewed with other batch dims")
    return space


def _check_no_writes_between(nodes: list, graph_nodes: list, order: dict) -> None:
    """The op runs where the old output was: nothing between the first product and it may write to a value
    (q, k, v, a mask, or an alias of one) that the old subgraph read earlier."""
    first, last = min(order[n] for n in nodes), max(order[n] for n in nodes)
    ours = set(nodes)
    for node in graph_nodes[first:last + 1]:
        if node not in ours and may_mutate(node):
            raise Refuse(f"an in-place op ({node.name}) runs between q @ k^T and the attention output")


def _match_softmax(softmax: fx.Node, graph_nodes: list, order: dict) -> Union[AttentionMatch, Refusal, None]:
    args = bind(softmax)
    scores_in = args["input"] if args is not None else (softmax.args[0] if softmax.args else None)
    chain = ScoreChain()
    try:
        try:  # find q @ k^T first: a softmax not fed by one is not attention and is not reported
            product = chain.walk(scores_in)
        except Refuse:
            if not _reaches_qk(scores_in):
                return None
            raise
        _softmax_input(softmax)
        pv, probs, v, dropout_p, forward_nodes, views = _forward_chain(softmax)
        chain.views |= views
        q, k = product.query, product.key
        qv, kv, vv = example(q), example(k), example(v)
        if qv is None or kv is None or vv is None or qv.dim() != kv.dim() or kv.dim() != vv.dim() or qv.dim() < 2:
            raise Refuse("q, k and v must be tensors with the same number of dims")
        if not (qv.dtype == kv.dtype == vv.dtype) or not qv.is_floating_point():
            raise Refuse(f"q, k and v must be floating tensors of one dtype ({qv.dtype}, {kv.dtype}, {vv.dtype})")
        if not same_batch(qv, kv, vv, gqa=False):
            raise Refuse("q, k and v have different batch dims (broadcast in the products)")
        space = _check_space(chain, softmax, chain.nodes[-1], q, k, probs, v)
        _check_no_writes_between(chain.nodes + forward_nodes, graph_nodes, order)
    except Refuse as err:
        return Refusal(PATTERN, module_path(softmax), softmax, str(err))
    mask = chain.mask if chain.mask.kind != "none" else None
    return AttentionMatch(
        pattern=PATTERN, module_path=module_path(softmax), output=pv, query=q, key=k, value=v, mask=mask,
        dropout_p=dropout_p, scale=chain.scale, traced_scale=tuple(chain.traced_scale),
        removable=tuple(reversed(chain.nodes)) + tuple(forward_nodes),
        space=space,
    )


def _reaches_qk(node, depth: int = 8) -> bool:
    """Whether some q @ k^T lies a few ops upstream (so a refusal is worth reporting)."""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if qk_product(node) is not None:
        return True
    return any(_reaches_qk(a, depth - 1) for a in node.all_input_nodes)


def _match_or_refuse(softmax: fx.Node, graph_nodes: list, order: dict) -> Union[AttentionMatch, Refusal, None]:
    try:
        return _match_softmax(softmax, graph_nodes, order)
    except Exception as err:  # a graph this matcher did not foresee: refuse it, never fail the compile
        return Refusal(PATTERN, module_path(softmax), softmax, f"could not analyze ({type(err).__name__}: {err})")


def find_handwritten_attention(gm: fx.GraphModule) -> list:
    """Matches and refusals for every softmax in the graph that is fed by q @ k^T."""
    graph_nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(graph_nodes)}
    results = (_match_or_refuse(node, graph_nodes, order) for node in graph_nodes if _is_softmax(node))
    return [result for result in results if result is not None]
