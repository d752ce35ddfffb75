"""Learned top-k projections: a per-key-head orthogonal d x d matrix R applied to queries and keys.

q~ = topk(q R), k~ = topk(k R). Because R is orthogonal, (q R)(k R)^T = q k^T: dense scores are unchanged and
R only decides which features survive top-k (DESIGN.md section 1). For RoPE models R must act after the
rotation, so it is applied at run time inside the attention function; for models without RoPE it can be
folded into the query/key projection weights once (``fold_into_linear``), costing nothing at run time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from .kernels.topk import project_by_key_head


class SFAProjection(nn.Module):
    """The SFA state of one attention layer: its ``topk`` and, unless folded away, R (key heads, d, d).

    Its presence on an attention module marks that layer as SFA. ``weight`` is a plain parameter holding an
    orthogonal matrix per key head; training keeps it orthogonal through ``orthogonal_training``.
    """

    def __init__(self, key_heads: int, head_dim: int, topk: int, runtime: bool = True):
        super().__init__()
        self.topk = topk
        self.key_heads = key_heads
        self.head_dim = head_dim
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(key_heads, 1, 1)) if runtime else None

    def extra_repr(self) -> str:
        return (f"key_heads={self.key_heads}, head_dim={self.head_dim}, topk={self.topk}, "
                f"runtime={self.weight is not None}")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, heads, length, d) with heads a multiple of key_heads -> x R of its key head."""
        return x if self.weight is None else project_by_key_head(x, self.weight)


def projection_parameters(model) -> set:
    """The run-time projections' parameters (R of every SFA layer): what FSDP2 must leave unsharded."""
    return {p for m in model.modules() if isinstance(m, SFAProjection) for p in m.parameters()}


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R^T R - I| over key heads (0 for an exact rotation)."""
    eye = torch.eye(r.size(-1), dtype=r.dtype, device=r.device)
    return (r.transpose(-1, -2) @ r - eye).abs().max().item()


def check_orthogonal(model) -> None:
    """Raise ValueError naming the first run-time projection of a loaded ``model`` that is not orthogonal (a
    corrupt or unloaded checkpoint tensor: R must be orthogonal or dense scores change)."""
    for name, module in model.named_modules():
        if isinstance(module, SFAProjection) and module.weight is not None:
            error = orthogonality_error(module.weight.detach().float())
            tolerance = 1e-3 if module.weight.dtype in (torch.float32, torch.float64) else 5e-2
            if not error <= tolerance:  # also catches NaN
                raise ValueError(f"SFA checkpoint: tensor '{name}.weight' is missing or corrupt (not "
                                 f"orthogonal: max |R^T R - I| = {error:.3g})")


def fold_into_linear(weight: torch.Tensor, bias, r: torch.Tensor, heads: int, head_dim: int, transposed: bool = False):
    """Fold R into a projection producing ``heads`` heads of ``head_dim`` (query heads use R of their key head).

    ``weight`` is (heads*d, in) for nn.Linear, or (in, heads*d) with ``transposed`` (GPT-2's Conv1D). Returns
    new (weight, bias) with x W'^T + b' = (x W^T + b) R per head: W_h' = R^T W_h, b_h' = b_h R.
    """
    group = heads // r.size(0)
    r_heads = r.repeat_interleave(group, dim=0).to(weight.dtype)  # (heads, d, d)
    w = weight.t() if transposed else weight
    w = w.reshape(heads, head_dim, -1)
    w = (r_heads.transpose(-1, -2) @ w).reshape(heads * head_dim, -1)
    if bias is not None:
        bias = (bias.reshape(heads, 1, head_dim) @ r_heads).reshape(-1)
    return (w.t().contiguous() if transposed else w.contiguous()), bias


def _full_precision(module) -> torch.autocast:
    """Autocast off for ``module``'s device: the orthogonal parametrization's set-up and removal compare and store
    float32 matrices, which a caller's autocast would compute in bf16/fp16."""
    return torch.autocast(module.weight.device.type, enabled=False)


class orthogonal_training:
    """Context manager: the projections' weights become orthogonally parametrized (and trainable) inside it,
    plain orthogonal tensors again after it. Yields the parameters to optimize. Works inside the caller's
    autocast (the parametrization itself runs in the weights' dtype)."""

    def __init__(self, projections: list):
        self.projections = projections

    def __enter__(self):
        for m in self.projections:
            m.weight.requires_grad_(True)
            with _full_precision(m):
                parametrizations.orthogonal(m, "weight")
        return [p for m in self.projections for p in m.parametrizations.weight.parameters()]

    def __exit__(self, *exc):
        for m in self.projections:
            with _full_precision(m):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return False


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_settings(settings, source: str) -> None:
    """Raise ValueError naming ``source`` and the field when a checkpoint's "sfa" settings are not what
    ``sfa_compile.convert`` records (SFAConfig's fields, the projection kind, the converted layers' shapes)."""
    from .config import SFAConfig

    if not isinstance(settings, dict):
        raise ValueError(f"{source}: 'sfa' must be a JSON object, got {type(settings).__name__}")
    recorded = ("projection", "converted_layers")
    try:
        config = SFAConfig.from_dict({k: v for k, v in settings.items() if k not in recorded})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: 'sfa' settings: {err}") from None
    if settings.get("projection") not in ("runtime", "folded"):
        raise ValueError(f"{source}: 'sfa.projection' must be \"runtime\" or \"folded\", got "
                         f"{settings.get('projection')!r}")
    layers = settings.get("converted_layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{source}: 'sfa.converted_layers' must map attention layer paths to [heads, key heads, "
                         f"head dim], got {layers!r}")
    for path, shape in layers.items():
        if not (isinstance(shape, list) and len(shape) == 3 and all(map(_positive_int, shape))
                and shape[0] % shape[1] == 0):
            raise ValueError(f"{source}: 'sfa.converted_layers[{path!r}]' must be [heads, key heads, head dim] "
                             f"(positive integers, heads a multiple of key heads), got {shape!r}")
        if config.topk > shape[2]:
            raise ValueError(f"{source}: 'sfa.topk' {config.topk} exceeds the head dim {shape[2]} of layer "
                             f"{path!r}")


def attach_projections(model, sfa_settings: dict) -> None:
    """Recreate the SFAProjection modules recorded in ``model.config.sfa`` (before loading their weights)."""
    check_settings(sfa_settings, "SFA checkpoint config.json")
    modules = dict(model.named_modules())
    runtime = sfa_settings.get("projection") == "runtime"
    for path, (_, key_heads, head_dim) in sfa_settings["converted_layers"].items():
        if path not in modules:
            raise ValueError(f"SFA checkpoint names attention layer {path!r}, which this model does not have")
        modules[path].sfa = SFAProjection(key_heads, head_dim, sfa_settings["topk"], runtime=runtime)
