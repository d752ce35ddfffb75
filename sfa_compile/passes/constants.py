"""Fold scalar constants in the graph the way eager PyTorch computes them.

A scale or fill value that depends on no graph input is evaluated by calling the node's own target on the
folded arguments (``torch.sqrt(torch.tensor(8., dtype=torch.bfloat16))`` is its bf16 value, 2.828125, not
Python's sqrt(8)). Anything that does not fold to one finite real number (an unlisted op, a tensor of several
elements, a complex or boolean value, an error such as a negative square root, inf or nan) is None: the
finder refuses it.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from .signatures import bind

STATIC_VALUE = "sfa_static_value"  # node.meta: a scalar proven constant (module_conversion.py)

_ARITHMETIC = {torch.sqrt, torch.rsqrt, math.sqrt, operator.neg, operator.mul, operator.truediv, operator.pow,
               operator.add, operator.sub, torch.mul, torch.div}
_FACTORIES = {torch.full, torch.tensor, torch.as_tensor, torch.scalar_tensor}
_FOLD_ERRORS = (ArithmeticError, ValueError, TypeError, RuntimeError)

Number = Union[int, float, torch.Tensor]


def _scalar(value: Any) -> Optional[Number]:
    """value if it is one real number (a Python int/float or a one-element real tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and (value.is_floating_point() or (
            not value.is_complex() and value.dtype != torch.bool)):
        return value
    return None


def fold(node: Any) -> Optional[Number]:
    """The value of a constant scalar expression, computed with its own targets and dtypes; None otherwise."""
    if isinstance(node, fx.Node) and STATIC_VALUE in node.meta:
        return _scalar(node.meta[STATIC_VALUE])
    if not isinstance(node, fx.Node):
        return _scalar(node)
    if node.op != "call_function" or node.target not in _ARITHMETIC | _FACTORIES:
        return None
    args = bind(node)
    if args is None:
        return None
    if node.target in _FACTORIES:
        return _factory(node.target, args)
    folded = [fold(node.args[i]) for i in range(len(node.args))]
    if node.kwargs or any(value is None for value in folded):
        return None
    try:
        with torch.no_grad():
            return _scalar(node.target(*folded))
    except _FOLD_ERRORS:
        return None


def _factory(target, args: dict) -> Optional[Number]:
    """torch.full of one element, torch.tensor / as_tensor / scalar_tensor of one number, on the CPU."""
    dtype = args.get("dtype")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return None
    if target is torch.full:
        size = args["size"]
        if not isinstance(size, (list, tuple)) or any(s != 1 for s in size):
            return None
        value = fold(args["fill_value"])
        make = lambda v: torch.full(tuple(size), v, dtype=dtype)  # noqa: E731
    else:
        value = fold(args["data"] if "data" in args else args["s"])
        make = lambda v: torch.tensor(v.item() if isinstance(v, torch.Tensor) else v, dtype=dtype)  # noqa: E731
    if value is None:
        return None
    try:
        return _scalar(make(value))
    except _FOLD_ERRORS:
        return None


def constant_value(node: Any) -> Optional[float]:
    """A constant scalar's value as a Python float (exact: every float dtype widens to float64), or None when
    it is not a finite real constant."""
    value = fold(node)
    if value is None:
        return None
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) else None


def traced_float(node: Any) -> Optional[fx.Node]:
    """``node`` when it is a float Dynamo traced as a graph value (a module's float attribute under
    ``torch.compile(dynamic=True)``): not a constant, but the op can be handed the same value at run time."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return node if isinstance(value, torch.SymFloat) else None


def guarded_float(value: Any) -> Any:
    """A float Dynamo traced as a graph value, as a Python float read under a guard (a changed value
    recompiles); any other value unchanged."""
    node = traced_float(value)
    return value if node is None else float(node.meta["example_value"])


def constant_fill(node: Any) -> Optional[float]:
    """Like constant_value, but -inf is allowed (a mask fill), nan and +inf are not."""
    value = fold(node)
    if value is None:
        return None
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) or number == float("-inf") else None
