"""Calling a model on one example, as conversion, calibration and fine-tuning all do; the grad mode they train in."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def trains(fn):
    """Decorate a function that trains: gradients on and inference mode off while it runs, so it works when called
    under the caller's ``torch.no_grad()`` or ``torch.inference_mode()`` (an evaluation script's context)."""
    return torch.inference_mode(False)(torch.enable_grad()(fn))


def _as_input(x, device):
    """A tensor argument on the model's device; an inference tensor (made under inference mode) is cloned, so that
    autograd may save it."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.to(device)
    return x.clone() if x.is_inference() and not torch.is_inference_mode_enabled() else x


def call_model(model, example):
    """Run ``model`` on one example: a mapping of keyword arguments (a dict, a tokenizer's BatchEncoding), a tuple
    of positional ones, or a tensor."""
    device = next(model.parameters()).device
    move = lambda x: _as_input(x, device)  # noqa: E731
    if isinstance(example, Mapping):
        return model(**{k: move(v) for k, v in example.items()})
    if isinstance(example, (tuple, list)):
        return model(*[move(x) for x in example])
    return model(move(example))


def check_examples(examples: list, caller: str, what: str) -> None:
    """Refuse, in one line, an item of ``examples`` that ``call_model`` cannot call a model with."""
    for i, item in enumerate(examples):
        if not isinstance(item, (Mapping, tuple, list, torch.Tensor)):
            raise TypeError(f"{caller}: {what} item {i} is of type {type(item).__name__}; pass mappings of keyword "
                            "arguments, tuples of positional ones, or tensors")
