"""Call arguments by parameter name, for the calls the finders accept, positional and keyword forms alike.

``bind(node)`` maps a call node to ``{parameter: value}`` with defaults filled in, or None when the call is
not one listed here or its arguments do not bind (the finders then refuse). Listed by hand because FX's
``normalize_function`` gives up on overloaded torch functions (mul, where, masked_fill: "ambiguous schema")
and on ``operator`` functions, which are most of what Dynamo records.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Signature:
    names: tuple  # parameter names in order; the tensor a method is called on is "input"
    defaults: tuple = ()  # (name, value) pairs for optional parameters
    keywords: bool = True  # operator functions take positional arguments only


def _sig(*names: str, keywords: bool = True, **defaults: Any) -> Signature:
    return Signature(tuple(names) + tuple(defaults), tuple(defaults.items()), keywords)


_BINARY = _sig("input", "other", keywords=False)
_SOFTMAX = _sig("input", "dim", dtype=None)
_TRANSPOSE = _sig("input", "dim0", "dim1")
_DIV = _sig("input", "other", rounding_mode=None)
_ADD = _sig("input", "other", alpha=1)
_BADDBMM = _sig("input", "batch1", "batch2", beta=1, alpha=1)
_MASKED_FILL = _sig("input", "mask", "value")
_SDPA = _sig("query", "key", "value", attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)

FUNCTIONS = {
    torch.matmul: _sig("input", "other"), operator.matmul: _BINARY, torch.bmm: _sig("input", "mat2"),
    torch.baddbmm: _BADDBMM,
    F.softmax: _sig("input", dim=None, _stacklevel=3, dtype=None), torch.softmax: _SOFTMAX,
    torch.Tensor.softmax: _SOFTMAX,
    torch.transpose: _TRANSPOSE, torch.swapaxes: _sig("input", "axis0", "axis1"), torch.swapdims: _TRANSPOSE,
    operator.mul: _BINARY, operator.imul: _BINARY, torch.mul: _sig("input", "other"),
    operator.truediv: _BINARY, operator.itruediv: _BINARY, torch.div: _DIV,
    operator.add: _BINARY, operator.iadd: _BINARY, torch.add: _ADD,
    operator.sub: _BINARY, operator.pow: _BINARY, operator.neg: _sig("input", keywords=False),
    torch.masked_fill: _MASKED_FILL, torch.where: _sig("condition", "input", "other"),
    F.dropout: _sig("input", p=0.5, training=True, inplace=False), torch.dropout: _sig("input", "p", "train"),
    torch._C._nn.scaled_dot_product_attention: _SDPA, F.scaled_dot_product_attention: _SDPA,
    torch.reshape: _sig("input", "shape"), torch.tanh: _sig("input"),
    torch.sqrt: _sig("input"), torch.rsqrt: _sig("input"), math.sqrt: _sig("input", keywords=False),
    torch.full: _sig("size", "fill_value", dtype=None, device=None, layout=None, requires_grad=False,
                     pin_memory=False),
    torch.tensor: _sig("data", dtype=None, device=None, requires_grad=False, pin_memory=False),
    torch.as_tensor: _sig("data", dtype=None, device=None),
    torch.scalar_tensor: _sig("s", dtype=None, layout=None, device=None, pin_memory=None),
}

METHODS = {
    "matmul": _sig("input", "other"), "bmm": _sig("input", "mat2"), "baddbmm": _BADDBMM,
    "softmax": _SOFTMAX, "transpose": _TRANSPOSE, "swapaxes": _sig("input", "axis0", "axis1"),
    "swapdims": _TRANSPOSE, "mul": _sig("input", "other"), "div": _DIV, "add": _ADD,
    "masked_fill": _MASKED_FILL, "tanh": _sig("input"), "type_as": _sig("input", "other"),
}


def signature(node: Any) -> Optional[Signature]:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        try:
            return FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target is none of ours
            return None
    if node.op == "call_method":
        return METHODS.get(node.target)
    return None


def bind(node: Any) -> Optional[dict]:
    """``{parameter: value}`` of a call listed here, defaults filled in; None if it is not listed or its
    arguments do not bind (too many, unknown or repeated keywords, a required one missing)."""
    sig = signature(node)
    if sig is None or len(node.args) > len(sig.names) or (node.kwargs and not sig.keywords):
        return None
    bound = dict(zip(sig.names, node.args))
    for name, value in node.kwargs.items():
        if name not in sig.names or name in bound:
            return None
        bound[name] = value
    for name, value in sig.defaults:
        bound.setdefault(name, value)
    return bound if len(bound) == len(sig.names) else None


def permute_dims(node: fx.Node) -> Optional[list]:
    """The dims of ``x.permute(...)`` / ``torch.permute(x, dims)``, given as varargs, a list or ``dims=``."""
    if node.op == "call_method" and node.target == "permute":
        rest, kwargs = node.args[1:], dict(node.kwargs)
    elif node.op == "call_function" and node.target is torch.permute:
        if len(node.args) < 1:
            return None
        rest, kwargs = node.args[1:], dict(node.kwargs)
    else:
        return None
    if "dims" in kwargs:
        if rest or set(kwargs) != {"dims"}:
            return None
        rest = (kwargs["dims"],)
    elif kwargs:
        return None
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return list(dims) if all(isinstance(d, int) and not isinstance(d, bool) for d in dims) else None


def einsum_call(node: Any) -> Optional[tuple[str, list]]:
    """(equation, operands) of ``torch.einsum(eq, a, b)`` or ``torch.einsum(eq, [a, b])``."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not torch.einsum:
        return None
    if node.kwargs or not node.args or not isinstance(node.args[0], str):
        return None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    return node.args[0], list(operands)
