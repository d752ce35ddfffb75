"""The walk from a softmax's input back to q @ k^T: scale factors, mask terms and batch-dim views, each proven.

Accepted steps: a scale (mul or div, also ``*=`` and ``/=`` on the scores) by a constant or by a float Dynamo
traced as a graph value (``dynamic=True``: the op is handed the same value); an additive mask
(``scores + mask``, ``+=``); a boolean mask by ``masked_fill`` or ``where`` with -inf or a dtype minimum; a
dtype-only cast between floating dtypes that keeps the range (a narrower one could overflow where the op does
not); ``contiguous``/``clone``; a view or reshape that regroups only the leading (batch) dims. Every value on
the chain must be read by exactly one node, once (a value filling two roles, e.g. the scores added to
themselves as their own mask, is refused), and keep the scores' shape (a mask may not broadcast the scores
larger). Anything else is a refusal with its reason.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .constants import constant_fill, constant_value, traced_float
from .graph_utils import CAST_METHODS, cast_source, example, is_function, is_method, is_very_negative, sole_consumer
from .match import MaskParts, MaskTerm
from .products import QKProduct, qk_product
from .signatures import bind

_SCALES = {operator.mul, operator.imul, torch.mul}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div}
_ADDS = {operator.add, operator.iadd, torch.add}
_IN_PLACE = {operator.imul, operator.itruediv, operator.iadd}  # mutate their first operand: it must be the scores


class Refuse(Exception):
    """A step whose meaning is not proven; the message is the reason users see."""


def leading(node: Any) -> tuple:
    """The batch dims of a value: all but its last two."""
    return tuple(example(node).shape[:-2])


def _name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def identity_source(node: Any) -> Optional[fx.Node]:
    """x for ``x.contiguous()`` / ``x.clone()`` (same values) or a floating cast of x, else None."""
    if is_method(node, "contiguous", "clone") and len(node.args) == 1:
        source, value = node.args[0], example(node)
        if example(source) is not None and value is not None and example(source).shape == value.shape:
            return source
        return None
    return cast_source(node)


def view_source(node: Any) -> Optional[fx.Node]:
    """x for a view/reshape of x that keeps its last two dims and regroups only the leading ones, else None."""
    if not (is_method(node, "view", "reshape") or is_function(node, {torch.reshape})) or not node.args:
        return None
    source = node.args[0]
    before, after = example(source), example(node)
    if before is None or after is None or before.dim() < 2 or after.dim() < 2:
        return None
    if tuple(before.shape[-2:]) != tuple(after.shape[-2:]) or before.dtype != after.dtype:
        return None
    return source


class ScoreChain:
    """Walks from the softmax input back to q @ k^T, collecting scale factors and mask terms."""

    def __init__(self):
        self.scale = 1.0
        self.traced_scale: list = []  # (node, divide): floats Dynamo traced as graph values
        self.mask = MaskParts()
        self.nodes: list = []
        self.views = False
        self.seen_scale = False  # walking backward: a mask met after this was applied before a scale

    def walk(self, node: Any) -> QKProduct:
        if not isinstance(node, fx.Node) or example(node) is None:
            raise Refuse("scores are not a tensor of the graph")
        if sole_consumer(node) is None:
            raise Refuse(f"scores ({node.name}) have other users, or fill two roles in one op")
        self.nodes.append(node)
        product = qk_product(node)
        if product is not None:
            return self._product(node, product)
        source = identity_source(node)
        if source is not None:
            if example(node).is_floating_point() and example(source).is_floating_point() and \
                    torch.finfo(example(node).dtype).max < torch.finfo(example(source).dtype).max:
                raise Refuse(f"a cast of the scores to {example(node).dtype} may overflow where the op would not")
            return self.walk(source)
        source = view_source(node)
        if source is not None:
            self.views = True
            return self.walk(source)
        if is_method(node, *CAST_METHODS):
            src = example(node.args[0]) if node.args else None
            raise Refuse(f"a cast from {getattr(src, 'dtype', '?')} to {example(node).dtype} between q @ k^T and "
                         "softmax (only floating-to-floating casts keep the values)")
        if is_function(node, {torch.tanh}) or is_method(node, "tanh"):
            raise Refuse("attention logit soft-capping (tanh of the scores) is not plain attention")
        args = bind(node)
        if args is None:
            raise Refuse(f"unsupported op between q @ k^T and softmax: {node.op} {_name(node)}")
        if is_function(node, _SCALES) or is_method(node, "mul"):
            return self._scale(node, args, divide=False)
        if is_function(node, _DIVISIONS) or is_method(node, "div"):
            if args.get("rounding_mode") is not None:
                raise Refuse("division with a rounding mode is not a scale")
            return self._scale(node, args, divide=True)
        if is_function(node, _ADDS) or is_method(node, "add"):
            if constant_value(args.get("alpha", 1)) != 1.0:
                raise Refuse("add with alpha is not a mask")
            return self._additive(node, args)
        if is_method(node, "masked_fill") or is_function(node, {torch.masked_fill}):
            return self._keep(node, args["input"], args["mask"], args["value"], negate=True)
        if is_function(node, {torch.where}):
            for scores, fill, negate in ((args["input"], args["other"], False), (args["other"], args["input"], True)):
                if isinstance(scores, fx.Node) and constant_fill(fill) is not None:
                    return self._keep(node, scores, args["condition"], fill, negate)
            raise Refuse("where() with no constant fill")
        raise Refuse(f"unsupported op between q @ k^T and softmax: {node.op} {_name(node)}")

    def _same_shape(self, node: fx.Node, scores: Any) -> None:
        if example(scores) is None or tuple(example(scores).shape) != tuple(example(node).shape):
            raise Refuse("a mask or scale broadcasts the scores to a larger shape")

    def _mask_allowed(self) -> None:
        if self.seen_scale:
            raise Refuse("the mask is applied before the scale, which would scale the mask too")

    def _product(self, node: fx.Node, product: QKProduct) -> QKProduct:
        if product.bias is not None:
            self._mask_allowed()
            self._term(node, product.bias, self.mask.additive)
            if example(product.bias).dim() > example(node).dim():
                raise Refuse("the bias broadcasts the scores to a larger shape")
        self.scale *= product.scale
        return product

    def _scale(self, node: fx.Node, args: dict, divide: bool) -> QKProduct:
        scores, factor, traced = args["input"], constant_value(args["other"]), traced_float(args["other"])
        if factor is None and traced is None and not divide and node.target not in _IN_PLACE:
            scores, factor, traced = args["other"], constant_value(args["input"]), traced_float(args["input"])
        if factor is None and traced is None:
            raise Refuse("scale is neither a finite constant nor a traced float")
        if divide and factor == 0:
            raise Refuse("division by zero")
        self._same_shape(node, scores)
        self.seen_scale = True
        if traced is not None:
            self.traced_scale.append((traced, divide))
        else:
            self.scale *= (1.0 / factor) if divide else factor
        return self.walk(scores)

    def _additive(self, node: fx.Node, args: dict) -> QKProduct:
        """scores + mask or mask + scores; only the former for ``+=``, which mutates its first operand (a mask
        mutated in place may be read again after the attention, e.g. by the next layer)."""
        pair = (args["input"], args["other"])
        if not all(isinstance(a, fx.Node) for a in pair):
            raise Refuse("a constant added to the scores is not a mask")
        orders = (pair,) if node.target in _IN_PLACE else (pair, pair[::-1])
        errors = []
        for scores, mask in orders:
            saved = (self.scale, list(self.traced_scale), list(self.mask.additive), list(self.mask.keep),
                     list(self.nodes), self.seen_scale, self.views)
            try:
                self._mask_allowed()
                self._same_shape(node, scores)
                self._term(node, mask, self.mask.additive)
                return self.walk(scores)
            except Refuse as err:
                errors.append(str(err))
                (self.scale, self.traced_scale, self.mask.additive, self.mask.keep, self.nodes, self.seen_scale,
                 self.views) = saved
        raise Refuse(errors[0])

    def _keep(self, node: fx.Node, scores: Any, cond: Any, fill: Any, negate: bool) -> QKProduct:
        value = constant_fill(fill)
        if not is_very_negative(value):
            raise Refuse(f"mask fill {value} is not -inf or a dtype minimum; the op cannot express it")
        cond_value = example(cond)
        if cond_value is None or cond_value.dtype != torch.bool:
            raise Refuse("the mask condition is not a boolean tensor")
        self._mask_allowed()
        self._same_shape(node, scores)
        self._term(node, cond, self.mask.keep, negate, value)
        return self.walk(scores)

    def _term(self, node: fx.Node, term: Any, terms: list, negate: bool = False,
              fill: float = float("-inf")) -> None:
        value = example(term)
        if value is None or value.is_complex():
            raise Refuse("the mask is not a real tensor")
        if value.dim() > example(node).dim():
            raise Refuse("a mask broadcasts the scores to a larger shape")
        terms.append(MaskTerm(term, leading(node), negate, fill))
