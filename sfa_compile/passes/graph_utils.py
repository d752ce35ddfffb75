"""Small helpers over Dynamo FX graphs: argument access, op classification, shapes, uses, writes, module paths."""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, torch.Tensor.softmax}
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as"}
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
    # The traced root: self, a model argument, or self seen as args[0] through a decorator's (*args, **kwargs).
    for prefix in ("L['self'].", "L['self']", "L['model'].", "L['model']", "L['args'][0].", "L['args'][0]"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").strip(".")


def cast_source(node: Any) -> Optional[fx.Node]:
    """The input of a dtype-only cast between real floating dtypes (same shape and device), else None.

    Checked on the recorded values, not the call's spelling: ``.to(torch.int32)``, ``.type(torch.IntTensor)``
    or ``.bool()`` change values, ``.to("cuda")`` moves them; none of those is a harmless cast."""
    if not is_method(node, *CAST_METHODS) or not node.args:
        return None
    source, out = node.args[0], example(node)
    src = example(source)
    if src is None or out is None or src.shape != out.shape or src.device != out.device:
        return None
    if not (src.is_floating_point() and out.is_floating_point()):
        return None
    return source


def dtype_only_use(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only the dtype of ``node`` (``x.type_as(node)`` with x another value)."""
    return is_method(user, "type_as") and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node


def uses(node: fx.Node, user: fx.Node) -> int:
    """How many times ``user`` takes ``node`` as an argument."""
    count = 0

    def visit(value):
        nonlocal count
        count += value is node
        return value

    torch.fx.node.map_arg((user.args, user.kwargs), visit)
    return count


def is_very_negative(value: Optional[float]) -> bool:
    """-inf or a float dtype's minimum: the fills a mask may use (rewrite_attention keeps a finite one's value)."""
    return value is not None and value in MASK_FILL_VALUES


def sole_consumer(node: fx.Node) -> Optional[fx.Node]:
    """The one node that reads ``node``'s values, taking it once; None if there are several, or one node
    takes it twice (one value may fill one role only). Uses that read only its dtype do not count."""
    consumers = [user for user in node.users if not dtype_only_use(user, node)]
    if len(consumers) != 1 or uses(node, consumers[0]) != 1:
        return None
    return consumers[0]


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.setitem}


def may_mutate(node: fx.Node) -> bool:
    """Whether a call may write to one of its arguments: in-place operators and methods (``add_``), item
    assignment, ``out=``. Conservative: a missed rewrite is only slower."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False  # placeholders, attributes, and leaf torch.nn modules (which write no argument)
    schema = getattr(node.target, "_schema", None)  # an aten/custom OpOverload says so itself
    if schema is not None and getattr(schema, "is_mutable", False):
        return True
    name = getattr(node.target, "__name__", "")
    return node.target in _IN_PLACE_OPERATORS or "out" in node.kwargs or (name.endswith("_") and not
                                                                          name.endswith("__"))


def same_batch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gqa: bool) -> bool:
    """Whether q, k and v have the same batch dims (no broadcasting between them); with ``gqa``, k and v may
    have fewer heads (dim -3) than q, a divisor of them."""
    qb, kb, vb = tuple(query.shape[:-2]), tuple(key.shape[:-2]), tuple(value.shape[:-2])
    if kb != vb or len(qb) != len(kb):
        return False
    if gqa and qb:
        return qb[:-1] == kb[:-1] and kb[-1] != 0 and qb[-1] % kb[-1] == 0
    return qb == kb
