"""Offline conversion of plain nn.Modules (not Hugging Face models): the backend's rewrite on a torch.fx trace.

``rewrite_module`` traces the model with torch.fx (torch.nn built-ins such as Linear stay calls of their
module, Softmax and Dropout are traced through so hand-written attention is visible), records shapes with fake
tensors, runs the same pass pipeline as ``torch.compile(backend="sfa")`` and returns a ``torch.fx.GraphModule``
that shares the model's parameters (same state_dict names) and owns, per rewritten site, an ``SFAAttention``
(``<module path>.sfa_attention``) holding its projection R. R stays a run-time projection: where the query and
key come from is not known in general (RoPE or not), so it is never folded into weights here.

Shapes stay generic: the trace keeps every size computation. Scales written from sizes (``q.size(-1) ** -0.5``)
are accepted when they keep their value as the input sizes vary (e.g. the head dim, which the model's weights
fix); a scale that depends on batch or length is refused like a non-constant one.
Inputs are the example's tensor arguments; its other arguments (flags, None) are fixed at trace time.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ..config import SFAConfig
from ..passes.constants import STATIC_VALUE
from ..passes.pipeline import run_pipeline
from ..projection import SFAProjection
from ..training.observers import notify
from ..training.straight_through import sfa_attention, straight_through_on

log = logging.getLogger("sfa_compile")

SITE_NAME = "sfa_attention"
TRACED_THROUGH = (nn.Softmax, nn.Dropout)  # torch.nn modules inlined so attention built from them is found
JSON_CONSTANTS = (type(None), bool, int, float, str)


class SFAAttention(nn.Module):
    """One rewritten attention site of a converted plain module: R (``self.sfa``) then FlashSFA.

    Takes SDPA's arguments. Inputs of rank 3 (heads folded into the batch) share one R (key_heads == 1).
    Reports every call to the observers, so calibration and Eq. 8 fine-tuning work as for Hugging Face models.
    """

    def __init__(self, key_heads: int, head_dim: int, topk: int):
        super().__init__()
        self.sfa = SFAProjection(key_heads, head_dim, topk)

    def forward(self, query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: Optional[float] = None, enable_gqa: bool = False):
        folded_heads = query.dim() == 3
        if folded_heads:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(1)
        query, key = self.sfa.project(query), self.sfa.project(key)
        sdpa_kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p if self.training else 0.0, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
        out = sfa_attention(query, key, value, topk=self.sfa.topk, straight_through=straight_through_on(self),
                            **sdpa_kwargs)
        notify(self, query, key, value, attn_mask, out, sdpa_kwargs)
        return out.squeeze(1) if folded_heads else out


@dataclasses.dataclass
class InputSpec:
    """What the trace was made from: the tensor arguments' shapes and dtypes, and the fixed other arguments."""

    tensors: dict  # name -> {"shape": [...], "dtype": "float32"}
    constants: dict  # name -> JSON value

    @classmethod
    def from_example(cls, model: nn.Module, example) -> "InputSpec":
        signature = inspect.signature(model.forward)
        try:
            if isinstance(example, Mapping):
                bound = signature.bind_partial(**example)
            elif isinstance(example, (tuple, list)):
                bound = signature.bind_partial(*example)
            else:
                bound = signature.bind_partial(example)
        except TypeError as err:
            raise TypeError(f"convert: the example input does not fit {type(model).__name__}.forward{signature}: "
                            f"{err}") from None
        tensors, constants = {}, {}
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor):
                tensors[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
            elif isinstance(value, JSON_CONSTANTS):
                constants[name] = value
            else:
                raise TypeError(f"convert: example argument {name!r} is a {type(value).__name__}; plain modules "
                                "are traced from tensors and constants (None, bool, int, float, str)")
        if not tensors:
            raise ValueError("convert: the example input has no tensor argument to trace with")
        return cls(tensors, constants)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fake_inputs(self, mode, device, shapes: Optional[dict] = None) -> list:
        """Fake tensors of the spec's dtypes, with its shapes or ``shapes`` (name -> shape)."""
        shapes = shapes or {name: spec["shape"] for name, spec in self.tensors.items()}
        return [mode.from_tensor(torch.empty(shapes[name], dtype=getattr(torch, spec["dtype"]), device=device))
                for name, spec in self.tensors.items()]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return not isinstance(module, TRACED_THROUGH) and super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module, spec: InputSpec) -> fx.GraphModule:
    signature = inspect.signature(model.forward)
    concrete = {}
    for name, param in signature.parameters.items():
        if name in spec.tensors or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in spec.constants:
            concrete[name] = spec.constants[name]
        elif param.default is not param.empty:
            concrete[name] = param.default
        else:
            raise ValueError(f"convert: the example input lacks argument {name!r} of {type(model).__name__}.forward")
    try:
        graph = _Tracer().trace(model, concrete_args=concrete)
    except Exception as err:  # torch.fx raises TraceError, TypeError, ... on data-dependent Python
        raise ValueError(
            f"convert: torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); a module with "
            "data-dependent Python control flow can still use SFA through torch.compile(model, backend='sfa')"
        ) from err
    return fx.GraphModule(model, graph, class_name=f"SFA{type(model).__name__}")


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _propagate(gm: fx.GraphModule, spec: InputSpec, device, shapes: Optional[dict] = None) -> bool:
    """Fake-tensor shape propagation (node.meta["val"]); False when the model rejects these shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    if shapes is not None:  # a rejected size is an expected outcome here, not an error to log
        fake_log.setLevel(logging.CRITICAL)
    try:
        FakeTensorProp(gm, mode).propagate(*spec.fake_inputs(mode, device, shapes))
    except Exception:  # any error of the model's own code at these sizes
        if shapes is None:
            raise
        return False
    finally:
        fake_log.setLevel(level)
    return True


def _scalars(gm: fx.GraphModule) -> dict:
    return {n: n.meta.get("val") for n in gm.graph.nodes
            if isinstance(n.meta.get("val"), (int, float)) and not isinstance(n.meta.get("val"), bool)}


def _record_shapes(gm: fx.GraphModule, spec: InputSpec, device) -> None:
    """Fake values for the example's own shapes, as Dynamo records them (``example_value``), and the mark of
    scalars that keep their value when the input sizes change (``STATIC_VALUE``, e.g. a scale from the head
    dim). Each group of equal input sizes is varied in turn (doubled, else plus one); a size the model accepts
    no other value for counts as fixed."""
    static = None
    sizes = sorted({size for t in spec.tensors.values() for size in t["shape"]})
    for size in sizes:
        for new in (2 * size, size + 1):
            shapes = {name: [new if s == size else s for s in t["shape"]] for name, t in spec.tensors.items()}
            if _propagate(gm, spec, device, shapes):
                varied = _scalars(gm)
                static = varied if static is None else {n: v for n, v in static.items() if varied.get(n) == v}
                break
    _propagate(gm, spec, device)
    base = _scalars(gm)
    static = base if static is None else {n: v for n, v in static.items() if base.get(n) == v}
    for node in gm.graph.nodes:
        node.meta["example_value"] = node.meta.pop("val", None)
        if node in static:
            node.meta[STATIC_VALUE] = float(static[node])


def rewrite_module(model: nn.Module, config: SFAConfig, spec: InputSpec) -> tuple[fx.GraphModule, dict, list]:
    """Trace ``model`` and rewrite its attention sites into SFAAttention calls with identity R.

    Traced in eval mode (dropout fixed off in the result); the model's own mode is restored. Returns (graph
    module, {site module path: [query heads, key heads, head dim]}, pipeline reports). Deterministic for a given
    model class and spec, which is what loading a checkpoint relies on.
    """
    was_training = model.training
    model.eval()
    try:
        gm = _trace(model, spec)
    finally:
        model.train(was_training)
    device = _device(model)
    _record_shapes(gm, spec, device)
    sites: dict[str, list] = {}

    def make_site(match, query, key) -> Optional[str]:
        if query.dim() not in (3, 4) or key.dim() != query.dim():
            return None
        base = ".".join(p for p in (match.module_path, SITE_NAME) if p)
        name, n = base, 1
        while name in sites:
            name, n = f"{base}_{n}", n + 1
        heads, key_heads = (query.size(1), key.size(1)) if query.dim() == 4 else (1, 1)
        gm.add_submodule(name, SFAAttention(int(key_heads), int(query.size(-1)), config.topk).to(device))
        sites[name] = [int(heads), int(key_heads), int(query.size(-1))]
        return name

    reports = run_pipeline(gm, config, make_site=make_site)
    for node in gm.graph.nodes:  # fake values belong to this conversion's fake modes, not to the module
        node.meta.pop("example_value", None)
    return gm, sites, reports


def settings(config: SFAConfig, spec: InputSpec, sites: dict, model_class: type) -> dict[str, Any]:
    """What a checkpoint of a converted plain module records (``model.sfa_settings``)."""
    return {**config.to_dict(), "projection": "runtime", "converted_sites": sites, "inputs": spec.to_dict(),
            "model_class": qualified_name(model_class)}


def qualified_name(cls: type) -> str:
    """``module.Class`` of a model class, as a checkpoint records it."""
    return f"{cls.__module__}.{cls.__qualname__}"
