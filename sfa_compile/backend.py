"""The ``torch.compile`` backend "sfa": rewrite attention in the Dynamo graph, then hand off to Inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="sfa", options={"topk": 16})`` works without importing sfa_compile. This
module must not register the name itself: Dynamo would see it twice and raise "duplicate name".
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional

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
        mode: Inductor's compile mode, as ``torch.compile(mode=...)`` takes it ("reduce-overhead": CUDA graphs,
            "max-autotune", ...); ``torch.compile`` refuses mode and options together, so it is also an option.
        inductor: Inductor settings given among the options by their names in ``torch._inductor.config``
            (e.g. ``"max_autotune": True``), as ``torch.compile(options=...)`` takes them for Inductor.
    """

    handoff: str = "inductor"
    mode: str = "default"
    inductor: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.handoff not in HANDOFFS:
            raise ValueError(f"sfa backend: handoff must be one of {list(HANDOFFS)}, got {self.handoff!r}")
        from torch._inductor import config, list_mode_options

        modes = list(list_mode_options())
        if self.mode not in modes:
            raise ValueError(f"sfa backend: mode must be one of {modes}, got {self.mode!r}")
        if self.handoff != "inductor" and (self.mode != "default" or self.inductor):
            raise ValueError(f"sfa backend: mode and Inductor options need handoff='inductor', got {self.handoff!r}")
        for name, value in self.inductor.items():
            kind = config.get_type(name)
            if isinstance(kind, type) and typing.get_origin(kind) is None and not isinstance(value, kind):
                raise ValueError(f"sfa backend: Inductor option {name!r} takes a {kind.__name__}, got {value!r}")

    def config_patches(self) -> dict:
        """Inductor config for this compile call: the mode's settings, then the options', then ours."""
        from torch._inductor import list_mode_options

        user = {**list_mode_options(self.mode), **self.inductor}
        return {**user, **inductor_guard.config_patches(user)}


def parse_options(options: Optional[dict], mode: Optional[str] = None) -> tuple[SFAConfig, BackendSettings]:
    """Split torch.compile ``options`` (and ``mode``) into SFAConfig fields, backend settings and Inductor
    settings; unknown keys are errors."""
    from torch._inductor import list_options

    options = dict(options or {})
    if mode not in (None, "default"):
        options["mode"] = mode
    config_keys = set(SFAConfig.field_names()) - {"version"}
    backend_keys = {f.name for f in dataclasses.fields(BackendSettings)} - {"inductor"}
    inductor_keys = set(list_options())
    sfa, backend, inductor, unknown = {}, {}, {}, []
    for key, value in options.items():
        name = key.replace("-", "_")  # Inductor's spelling, as torch.compile accepts either
        if key in config_keys:
            sfa[key] = value
        elif key in backend_keys:
            backend[key] = value
        elif name in inductor_keys:
            inductor[name] = value
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(config_keys | backend_keys)
        raise ValueError(f"sfa backend: unknown option(s) {sorted(unknown)}; valid options: {valid}, or an Inductor "
                         "setting (torch._inductor.list_options())")
    return SFAConfig(**sfa), BackendSettings(**backend, inductor=inductor)


def sfa_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                mode: Optional[str] = None):
    """Dynamo backend: run the pass pipeline on ``gm``, then compile it with the hand-off backend."""
    from torch._dynamo.backends.registry import lookup_backend

    config, settings = parse_options(options, mode)
    warn_or_raise(left_dense(run_pipeline(gm, config), config), config, "sfa backend")
    if settings.handoff == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=settings.config_patches())
    return lookup_backend(settings.handoff)(gm, example_inputs)
