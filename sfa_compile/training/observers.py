"""Observers of SFA attention calls, shared by every place attention runs (the Hugging Face attention function
and the attention sites of converted plain modules).

Conversion uses them to find attention layers and collect calibration statistics, fine-tuning to add the
paper's Eq. 8 distillation loss. An observer is called as ``fn(module, query, key, value, attention_mask,
output, sdpa_kwargs)``, where ``module.sfa`` is the layer's SFAProjection (None for a dense layer) and query/key
are as the layer uses them (after its projection).

Observers belong to one model for the length of a block: ``observe(model, fn)`` marks the model's modules, and
an attention call reads the marks of the layer it runs in (no process-wide list; two models in one process, or
a compiled one, never see each other's observers).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

OBSERVERS = "_sfa_observers"  # attribute of a module while observers watch it


@contextlib.contextmanager
def marked(model: torch.nn.Module, attribute: str, value: Callable[[Any], Any]):
    """Set ``attribute`` on every module of ``model`` to ``value(its current value or None)`` inside the block;
    the previous state is restored after it."""
    modules = list(model.modules())
    saved = [m.__dict__.get(attribute) for m in modules]
    for module, old in zip(modules, saved):
        module.__dict__[attribute] = value(old)
    try:
        yield
    finally:
        for module, old in zip(modules, saved):
            if old is None:
                module.__dict__.pop(attribute, None)
            else:
                module.__dict__[attribute] = old


def observe(model: torch.nn.Module, fn: Callable):
    """Call ``fn`` on every attention call of ``model``'s layers inside the block."""
    return marked(model, OBSERVERS, lambda old: (old or ()) + (fn,))


def notify(module, query, key, value, attention_mask, output, sdpa_kwargs) -> None:
    for fn in getattr(module, OBSERVERS, ()):
        fn(module, query, key, value, attention_mask, output, sdpa_kwargs)
