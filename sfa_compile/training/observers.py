"""Observers of SFA attention calls, shared by every place attention runs (the Hugging Face attention function
and the attention sites of converted plain modules).

Conversion uses them to find attention layers and collect calibration statistics, fine-tuning to add the
paper's Eq. 8 distillation loss. An observer is called as ``fn(module, query, key, value, attention_mask,
output, sdpa_kwargs)``, where ``module.sfa`` is the layer's SFAProjection (None for a dense layer) and query/key
are as the layer uses them (after its projection).
"""

from __future__ import annotations

import contextlib
from typing import Callable

_observers: list[Callable] = []


@contextlib.contextmanager
def observe(fn: Callable):
    """Call ``fn`` on every attention call inside the block."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def notify(module, query, key, value, attention_mask, output, sdpa_kwargs) -> None:
    for fn in list(_observers):
        fn(module, query, key, value, attention_mask, output, sdpa_kwargs)
