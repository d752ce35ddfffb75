"""Calling a model on one example, as conversion, calibration and fine-tuning all do."""

from __future__ import annotations

import torch


def call_model(model, example):
    """Run ``model`` on one example: a dict of keyword arguments, a tuple of positional ones, or a tensor."""
    device = next(model.parameters()).device
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    if isinstance(example, dict):
        return model(**{k: move(v) for k, v in example.items()})
    if isinstance(example, (tuple, list)):
        return model(*[move(x) for x in example])
    return model(move(example))


def check_examples(examples: list, caller: str, what: str) -> None:
    """Refuse, in one line, an item of ``examples`` that ``call_model`` cannot call a model with."""
    for i, item in enumerate(examples):
        if not isinstance(item, (dict, tuple, list, torch.Tensor)):
            raise TypeError(f"{caller}: {what} item {i} is of type {type(item).__name__}; pass dicts of keyword "
                            "arguments, tuples of positional ones, or tensors")
