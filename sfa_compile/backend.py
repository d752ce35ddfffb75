"""The ``torch.compile`` backend "sfa": rewrite attention in the Dynamo graph, then hand off to Inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="sfa", options={"topk": 16})`` works without importing sfa_compile. This
module must not register the name itself: Dynamo would see it twice and raise "duplicate name".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.fx as fx

from .config import SFAConfig
from .passes import inductor_guard
from .passes.pipeline import left_dense, run_pipeline, warn_or_raise

HANDOFFS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """Backend-only settings (SFA settings live in SFAConfig).

    Attributes:
        handoff: compiler for the rewritten graph: "inductor" (default), or "aot_eager"/"eager" to debug.
    """

    handoff: str = "inductor"

    def __post_init__(self) -> None:
        if self.handoff not in HANDOFFS:
            raise ValueError(f"sfa backend: handoff must be one of {list(HANDOFFS)}, got {self.handoff!r}")


def parse_options(options: Optional[dict]) -> tuple[SFAConfig, BackendSettings]:
    """Split torch.compile ``options`` into SFAConfig fields and backend settings; unknown keys are errors."""
    options = dict(options or {})
    config_keys = set(SFAConfig.field_names()) - {"version"}
    backend_keys = {f.name for f in dataclasses.fields(BackendSettings)}
    unknown = sorted(set(options) - config_keys - backend_keys)
    if unknown:
        valid = sorted(config_keys | backend_keys)
        raise ValueError(f"sfa backend: unknown option(s) {unknown}; valid options: {valid}")
    config = SFAConfig(**{k: v for k, v in options.items() if k in config_keys})
    settings = BackendSettings(**{k: v for k, v in options.items() if k in backend_keys})
    return config, settings


def sfa_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None, **kwargs: Any):
    """Dynamo backend: run the pass pipeline on ``gm``, then compile it with the hand-off backend."""
    from torch._dynamo.backends.registry import lookup_backend

    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(f"sfa backend: mode={kwargs['mode']!r} is not supported; pass Inductor settings in options")
    config, settings = parse_options(options)
    warn_or_raise(left_dense(run_pipeline(gm, config), config), config, "sfa backend")
    if settings.handoff == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=inductor_guard.config_patches())
    return lookup_backend(settings.handoff)(gm, example_inputs)
