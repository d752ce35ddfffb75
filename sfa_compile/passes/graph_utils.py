"""Small helpers over Dynamo FX graphs: argument access, op classification, shapes, constants, module paths."""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, torch.Tensor.softmax}
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as"}
STATIC_VALUE = "sfa_static_value"  # node.meta: a scalar proven constant (module_conversion.py), read by constant_value
MASK_FILL_VALUES = {float("-inf")} | {torch.finfo(d).min for d in (torch.float16, torch.bfloat16, torch.float32,
                                                                  torch.float64)}


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given positionally at ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_function(node: Any, functions) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in functions


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def example(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo recorded for a node (None for non-tensors)."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def static_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module of the model's own code a node came from, e.g. 'transformer.h.0.attn'
    (torch.nn built-ins such as an nn.Softmax module are skipped: the attention layer is the one that owns them)."""
    stack = [(path, kind) for path, kind in (node.meta.get("nn_module_stack") or {}).values()
             if not getattr(kind, "__module__", "").startswith("torch.nn.modules")]
    if not stack:
        return ""
    path = stack[-1][0]
    for prefix in ("L['self'].", "L['self']", "L['model'].", "L['model']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").strip(".")


def is_cast(node: Any) -> bool:
    """A dtype-only cast (precision change, no other effect)."""
    if not is_method(node, *CAST_METHODS):
        return False
    if node.target == "to":
        return all(isinstance(a, torch.dtype) for a in node.args[1:]) and set(node.kwargs) <= {
            "dtype", "copy", "non_blocking"}
    if node.target == "type":  # .type() with no dtype returns the type's name, not a tensor
        return len(node.args) > 1 or "dtype" in node.kwargs
    return True


def constant_value(node: Any) -> Optional[float]:
    """Evaluate a scalar that depends on no graph input (a Python number, torch.full/tensor of one, sqrt
    of one, arithmetic of those, or a value shape analysis proved constant: meta STATIC_VALUE, set by
    module_conversion.py); None if it is not such a constant."""
    if isinstance(node, bool):
        return None
    if isinstance(node, fx.Node) and STATIC_VALUE in node.meta:
        return node.meta[STATIC_VALUE]
    if isinstance(node, (int, float)):
        return float(node)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    target = node.target
    if target is torch.full:
        size = arg(node, 0, "size")
        return constant_value(arg(node, 1, "fill_value")) if tuple(size) in ((), (1,)) else None
    if target in (torch.tensor, torch.as_tensor, torch.scalar_tensor):
        return constant_value(arg(node, 0, "data"))
    unary = {torch.sqrt: math.sqrt, math.sqrt: math.sqrt, torch.rsqrt: lambda x: 1 / math.sqrt(x),
             operator.neg: operator.neg}
    if target in unary:
        inner = constant_value(node.args[0])
        return None if inner is None else float(unary[target](inner))
    binary = {operator.mul: operator.mul, operator.truediv: operator.truediv, operator.pow: operator.pow,
              torch.mul: operator.mul, torch.div: operator.truediv, operator.add: operator.add,
              operator.sub: operator.sub}
    if target in binary and len(node.args) == 2:
        a, b = constant_value(node.args[0]), constant_value(node.args[1])
        return None if a is None or b is None else float(binary[target](a, b))
    return None


def is_very_negative(value: Optional[float]) -> bool:
    """-inf or a float dtype's minimum: masking with it is the same as -inf except for fully masked rows."""
    return value is not None and value in MASK_FILL_VALUES


def single_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None
