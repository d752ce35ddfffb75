"""The two products of attention, recognized only where their meaning is proven.

``qk_product``: ``q @ k^T`` as matmul/bmm with k's last two dims swapped (transpose, swapaxes, permute, mT),
``baddbmm(bias, q, k^T, beta=1, alpha=c)`` (Bloom's ALiBi: c * q @ k^T + bias), or an einsum whose subscripts
are exactly the batched contraction over the feature axis. ``pv_product``: ``p @ v`` with p on the left, by
matmul/bmm or the einsum contracting the key axis. Einsum subscripts must have one letter per axis, no
repeated letter within an operand (that is a diagonal), no ellipsis, an explicit output, and the same batch
letters in the same order on both operands and the output.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .constants import constant_value
from .graph_utils import example, is_function, is_method
from .signatures import bind, einsum_call, permute_dims

_MATMULS = {torch.matmul, operator.matmul, torch.bmm}
_TRANSPOSES = {torch.transpose, torch.swapaxes, torch.swapdims}


@dataclasses.dataclass
class QKProduct:
    query: fx.Node
    key: fx.Node  # not transposed: (..., S, E)
    scale: float = 1.0  # baddbmm's alpha
    bias: Optional[fx.Node] = None  # baddbmm's input, added after the scale


def transposed_source(node: Any) -> Optional[fx.Node]:
    """k if ``node`` is k with exactly its last two dims swapped, else None."""
    value = example(node)
    if value is None or value.dim() < 2:
        return None
    ndim = value.dim()
    args = bind(node) if (is_function(node, _TRANSPOSES) or is_method(node, "transpose", "swapaxes", "swapdims")) \
        else None
    if args is not None:
        dims = list(args.values())[1:3]
        if all(isinstance(d, int) and not isinstance(d, bool) and -ndim <= d < ndim for d in dims) and \
                sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]:
            return args["input"]
        return None
    dims = permute_dims(node) if is_method(node, "permute") or is_function(node, {torch.permute}) else None
    if dims is not None:
        if len(dims) == ndim and all(-ndim <= d < ndim for d in dims) and \
                [d % ndim for d in dims] == list(range(ndim - 2)) + [ndim - 1, ndim - 2]:
            return node.args[0]
        return None
    if is_function(node, {getattr}) and len(node.args) == 2 and node.args[1] == "mT":
        return node.args[0]
    return None


def parse_einsum(equation: str, ranks: list) -> Optional[tuple[list, str]]:
    """(operand subscripts, output subscript) of a two-operand equation meeting the rules above, else None."""
    if not isinstance(equation, str):
        return None
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2 or len(ranks) != 2:
        return None
    for term, rank in zip(terms + [out], ranks + [None]):
        if not term.isalpha() or not term.isascii() or len(set(term)) != len(term):
            return None
        if rank is not None and len(term) != rank:
            return None
    return terms, out


def _einsum(node: Any, contract_last: bool) -> Optional[tuple[fx.Node, fx.Node]]:
    """(a, b) of an einsum 'Xij,Xkj->Xik' (contract_last: q k^T) or 'Xij,Xjk->Xik' (p v)."""
    call = einsum_call(node)
    if call is None or len(call[1]) != 2:
        return None
    equation, (a, b) = call
    values = [example(a), example(b)]
    if any(v is None for v in values):
        return None
    parsed = parse_einsum(equation, [v.dim() for v in values])
    if parsed is None:
        return None
    (ta, tb), out = parsed
    if len(ta) < 2 or len(tb) != len(ta) or len(out) != len(ta):
        return None
    batch, (i, contracted) = ta[:-2], ta[-2:]
    if contract_last:  # q k^T: the feature axis is last on both operands
        free = tb[-2]
        want_b = batch + free + contracted
    else:  # p v: the key axis is last on p, second to last on v
        free = tb[-1]
        want_b = batch + contracted + free
    if tb != want_b or out != batch + i + free or free in set(batch) | {i, contracted}:
        return None
    return a, b


def qk_product(node: Any) -> Optional[QKProduct]:
    """q @ k^T (and its scale and bias), if ``node`` computes one as described above."""
    if is_function(node, _MATMULS) or is_method(node, "matmul", "bmm"):
        args = bind(node)
        if args is None:
            return None
        left, right = args["input"], args.get("other", args.get("mat2"))
        key = transposed_source(right)
        return QKProduct(left, key) if key is not None and isinstance(left, fx.Node) else None
    if is_function(node, {torch.baddbmm}) or is_method(node, "baddbmm"):
        args = bind(node)
        if args is None or not isinstance(args["input"], fx.Node) or not isinstance(args["batch1"], fx.Node):
            return None
        key, beta, alpha = transposed_source(args["batch2"]), constant_value(args["beta"]), constant_value(
            args["alpha"])
        if key is None or beta != 1.0 or alpha is None:
            return None
        return QKProduct(args["batch1"], key, alpha, args["input"])
    pair = _einsum(node, contract_last=True)
    return QKProduct(*pair) if pair is not None else None


def pv_value(node: Any, probs: fx.Node) -> Optional[fx.Node]:
    """v if ``node`` computes probs @ v with probs on the left (and only there), else None."""
    if is_function(node, _MATMULS) or is_method(node, "matmul", "bmm"):
        args = bind(node)
        if args is None or args["input"] is not probs:
            return None
        value = args.get("other", args.get("mat2"))
    else:
        pair = _einsum(node, contract_last=False)
        if pair is None or pair[0] is not probs:
            return None
        value = pair[1]
    return value if isinstance(value, fx.Node) and value is not probs else None
