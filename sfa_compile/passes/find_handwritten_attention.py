"""Pass: find hand-written attention, softmax(mask(scale * q @ k^T)) @ v, anchored on each softmax.

Matches (pattern "matmul_softmax_matmul", the form of Hugging Face eager attention, GPT-2, BERT, ViT and
Whisper): q @ k^T by matmul/bmm/einsum with k transposed by transpose/permute/mT; scale by mul or div with
a constant (Python number, torch.full/tensor, sqrt of one); masks by add (float), masked_fill or where
with -inf or a dtype minimum (boolean); the in-place operators on the scores (``scores /= math.sqrt(d)``, as
Falcon's eager attention writes it, ``*=``, ``+= mask``): the scores are fresh and have no other users, so
mutating them is their out-of-place form; dtype casts anywhere; softmax over the last dim; dropout; then
probabilities @ v.

Refuses (returns a Refusal, graph untouched): softmax over another dim; scores or probabilities with
other users (e.g. attention weights returned); a scale that is not a constant; a mask applied before the
scale; a mask updated in place (``mask += scores``: the caller may read the mask again); fill values the op
cannot express exactly; anything else between the matmuls. A wrong rewrite is
silent corruption, a missed one is only slower.
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch
import torch.fx as fx

from .graph_utils import (DROPOUT_FUNCTIONS, MATMUL_FUNCTIONS, SOFTMAX_FUNCTIONS, arg, constant_value, example,
                          is_cast, is_function, is_method, is_very_negative, module_path, single_user, static_int)
from .match import AttentionMatch, MaskParts, Refusal

PATTERN = "matmul_softmax_matmul"


class _Refuse(Exception):
    pass


def _is_softmax(node: fx.Node) -> bool:
    return is_function(node, SOFTMAX_FUNCTIONS) or is_method(node, "softmax")


def _is_last_dim(node: fx.Node, dim) -> bool:
    ndim = example(node).dim() if example(node) is not None else None
    return dim == -1 or (ndim is not None and dim == ndim - 1)


def _transposed_source(node) -> Optional[fx.Node]:
    """k if node is k with its last two dims swapped (transpose/permute/mT), else None."""
    value = example(node)
    if value is None:
        return None
    ndim = value.dim()
    if is_method(node, "transpose") or is_function(node, {torch.transpose}):
        dims = (arg(node, 1, "dim0"), arg(node, 2, "dim1"))
        if all(isinstance(d, int) for d in dims) and {d % ndim for d in dims} == {ndim - 2, ndim - 1}:
            return node.args[0]
    if is_method(node, "permute") or is_function(node, {torch.permute}):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        dims = [d % ndim for d in dims]
        if dims == list(range(ndim - 2)) + [ndim - 1, ndim - 2]:
            return node.args[0]
    if is_function(node, {getattr}) and node.args[1] == "mT":
        return node.args[0]
    return None


def _einsum_qk(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(q, k) for einsum('...id,...jd->...ij', q, k)."""
    if not is_function(node, {torch.einsum}) or len(node.args) != 3:
        return None
    eq = node.args[0].replace(" ", "")
    lhs, _, out = eq.partition("->")
    parts = lhs.split(",")
    if len(parts) != 2 or len(parts[0]) != len(parts[1]) or len(parts[0]) < 2:
        return None
    (qi, qd), (kj, kd) = parts[0][-2:], parts[1][-2:]
    batch = parts[0][:-2]
    if parts[1][:-2] != batch or qd != kd or out != batch + qi + kj or len({qi, qd, kj}) != 3:
        return None
    return node.args[1], node.args[2]


def _qk(node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(q, k) if node computes q @ k^T."""
    if is_function(node, MATMUL_FUNCTIONS) or is_method(node, "matmul", "bmm"):
        k = _transposed_source(node.args[1])
        return (node.args[0], k) if k is not None else None
    return _einsum_qk(node)


def _einsum_pv(node: fx.Node, probs: fx.Node) -> Optional[fx.Node]:
    if not is_function(node, {torch.einsum}) or len(node.args) != 3 or node.args[1] is not probs:
        return None
    lhs, _, out = node.args[0].replace(" ", "").partition("->")
    parts = lhs.split(",")
    if len(parts) != 2 or len(parts[0]) < 2:
        return None
    batch, (i, j) = parts[0][:-2], parts[0][-2:]
    if parts[1][:-2] != batch or parts[1][-2] != j or out != batch + i + parts[1][-1]:
        return None
    return node.args[2]


def _pv_value(node: fx.Node, probs: fx.Node) -> Optional[fx.Node]:
    """v if node computes probs @ v with probs on the left."""
    if (is_function(node, MATMUL_FUNCTIONS) or is_method(node, "matmul", "bmm")) and node.args[0] is probs:
        return node.args[1] if node.args[1] is not probs else None
    return _einsum_pv(node, probs)


class _ScoreChain:
    """Walks from the softmax input back to q @ k^T, collecting scale factors and mask terms."""

    def __init__(self):
        self.scale = 1.0
        self.mask = MaskParts()
        self.nodes: list = []
        self.seen_scale = False  # walking backward, a mask met after a scale was applied before it

    def walk(self, node) -> tuple[fx.Node, fx.Node]:
        if not isinstance(node, fx.Node):
            raise _Refuse("scores are not a graph value")
        if len(node.users) != 1:
            raise _Refuse(f"scores ({node.name}) have other users")
        self.nodes.append(node)
        qk = _qk(node)
        if qk is not None:
            return qk
        if is_cast(node):
            return self.walk(node.args[0])
        if is_function(node, {operator.mul, torch.mul}) or is_method(node, "mul"):
            return self._scale(node, node.args[0], node.args[1], divide=False)
        if is_function(node, {operator.imul}):  # scores *= c: the mutated operand must be the scores
            return self._scale(node, node.args[0], node.args[1], divide=False, scores_first=True)
        if is_function(node, {operator.truediv, torch.div, operator.itruediv}) or is_method(node, "div"):
            if arg(node, 2, "rounding_mode") is not None:
                raise _Refuse("division with a rounding mode is not a scale")
            return self._scale(node, node.args[0], node.args[1], divide=True)
        if is_function(node, {operator.add, torch.add, operator.iadd}) or is_method(node, "add"):
            if arg(node, 2, "alpha", 1) != 1:
                raise _Refuse("add with alpha is not a mask")
            return self._additive(node, scores_first=node.target is operator.iadd)
        if is_method(node, "masked_fill") or is_function(node, {torch.masked_fill}):
            fill = constant_value(node.args[2])
            if not is_very_negative(fill):
                raise _Refuse(f"masked_fill with {fill} is not -inf or a dtype minimum; the op cannot express it")
            self._mask_allowed()
            self.mask.keep.append((node.args[1], True))
            return self.walk(node.args[0])
        if is_function(node, {torch.where}) and len(node.args) == 3:
            cond, a, b = node.args
            for scores, other, negate in ((a, b, False), (b, a, True)):
                if isinstance(scores, fx.Node) and is_very_negative(constant_value(other)):
                    self._mask_allowed()
                    self.mask.keep.append((cond, negate))
                    return self.walk(scores)
            raise _Refuse("where() with a fill that is not -inf or a dtype minimum")
        raise _Refuse(f"unsupported op between q @ k^T and softmax: {node.op} {getattr(node.target, '__name__', node.target)}")

    def _mask_allowed(self):
        if self.seen_scale:
            raise _Refuse("the mask is applied before the scale, which would scale the mask too")

    def _scale(self, node, a, b, divide: bool, scores_first: bool = False):
        factor = constant_value(b)
        scores = a
        if factor is None and not divide and not scores_first:
            factor, scores = constant_value(a), b
        if factor is None:
            raise _Refuse("scale is not a constant")
        self.seen_scale = True
        if divide and factor == 0:
            raise _Refuse("division by zero")
        self.scale *= (1.0 / factor) if divide else factor
        return self.walk(scores)

    def _additive(self, node, scores_first: bool = False):
        """scores + mask or mask + scores; only the former for ``+=``, which mutates its first operand (a mask
        mutated in place may be read again after the attention, e.g. by the next layer)."""
        errors = []
        orders = ((node.args[0], node.args[1]), (node.args[1], node.args[0]))
        for scores, mask in orders[:1] if scores_first else orders:
            if not isinstance(scores, fx.Node) or not isinstance(mask, fx.Node):
                continue
            saved = (self.scale, list(self.mask.additive), list(self.mask.keep), list(self.nodes), self.seen_scale)
            try:
                self._mask_allowed()
                q, k = self.walk(scores)
            except _Refuse as err:
                errors.append(str(err))
                self.scale, self.mask.additive, self.mask.keep, self.nodes, self.seen_scale = saved
                continue
            self.mask.additive.append(mask)
            return q, k
        if any(not isinstance(a, fx.Node) for a in node.args[:2]):
            raise _Refuse("a constant added to the scores is not a mask")
        raise _Refuse(errors[0] if errors else "could not tell scores from mask")


def _forward_chain(softmax: fx.Node) -> tuple[fx.Node, fx.Node, float, list]:
    """From the softmax to probs @ v: (pv node, v, dropout_p, chain nodes)."""
    node, dropout_p, nodes = softmax, 0.0, [softmax]
    while True:
        user = single_user(node)
        if user is None:
            raise _Refuse(f"attention probabilities ({node.name}) have other users, e.g. returned attention weights")
        if is_cast(user):
            node = user
        elif is_function(user, DROPOUT_FUNCTIONS) or is_method(user, "dropout"):
            if arg(user, 3, "inplace", False):
                raise _Refuse("in-place dropout on the probabilities")
            p = constant_value(arg(user, 1, "p", 0.5))
            training = arg(user, 2, "training" if user.target is not torch.dropout else "train", True)
            if p is None or not isinstance(training, bool):
                raise _Refuse("dropout with a non-constant p or training flag")
            dropout_p = p if training else 0.0
            node = user
        else:
            v = _pv_value(user, node)
            if v is None:
                raise _Refuse(f"probabilities feed {getattr(user.target, '__name__', user.target)}, not @ v")
            nodes.append(user)
            return user, v, dropout_p, nodes
        nodes.append(node)


def _match_softmax(softmax: fx.Node) -> Union[AttentionMatch, Refusal, None]:
    dim = arg(softmax, 1, "dim")
    scores_in = softmax.args[0]
    try:
        # Find q @ k^T first: a softmax that is not fed by one is not attention and is not reported.
        chain = _ScoreChain()
        try:
            q, k = chain.walk(scores_in)
        except _Refuse:
            if not _reaches_qk(scores_in):
                return None
            raise
        scores_shape = tuple(example(chain.nodes[-1]).shape)
        if any(tuple(example(n).shape) != scores_shape for n in chain.nodes if example(n) is not None):
            raise _Refuse("a mask broadcasts the scores to a larger shape")
        if not _is_last_dim(softmax, dim):
            raise _Refuse(f"softmax over dim {dim}, not the key dim")
        pv, v, dropout_p, forward_nodes = _forward_chain(softmax)
        qv, kv, vv = example(q), example(k), example(v)
        if qv is None or kv is None or vv is None or qv.dim() != kv.dim() or kv.dim() != vv.dim() or qv.dim() < 2:
            raise _Refuse("q, k and v must be tensors with the same number of dims")
        if not (qv.dtype == kv.dtype == vv.dtype):
            raise _Refuse(f"q, k and v dtypes differ ({qv.dtype}, {kv.dtype}, {vv.dtype})")
        if static_int(qv.size(-1)) is None:
            raise _Refuse("head dim is not static")
    except _Refuse as err:
        return Refusal(PATTERN, module_path(softmax), softmax, str(err))
    mask = chain.mask if chain.mask.kind != "none" else None
    return AttentionMatch(
        pattern=PATTERN, module_path=module_path(softmax), output=pv, query=q, key=k, value=v, mask=mask,
        dropout_p=dropout_p, scale=chain.scale, removable=tuple(reversed(chain.nodes)) + tuple(forward_nodes),
    )


def _reaches_qk(node, depth: int = 8) -> bool:
    """Whether some q @ k^T lies a few ops upstream (so a refusal is worth reporting)."""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if _qk(node) is not None:
        return True
    return any(_reaches_qk(a, depth - 1) for a in node.all_input_nodes)


def find_handwritten_attention(gm: fx.GraphModule) -> list:
    """Matches and refusals for every softmax in the graph that is fed by q @ k^T."""
    results = []
    for node in gm.graph.nodes:
        if _is_softmax(node):
            result = _match_softmax(node)
            if result is not None:
                results.append(result)
    return results
