"""Fine-tuning a converted model with the paper's Eq. 8: L = L_task + lambda * distillation.

A plain PyTorch loop. It trains the projections R (kept orthogonal) and, with ``train_model``, the model's
own weights. Under ``torchrun`` (torch.distributed initialized) the model is wrapped in
DistributedDataParallel after the projections are parametrized, so every process holds the same R.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .distill import attention_distillation
from .progress import progress_bar
from .projection import SFAProjection, orthogonal_training


def call_model(model, example):
    """Run ``model`` on one example: a dict of keyword arguments, a tuple of positional ones, or a tensor."""
    device = next(model.parameters()).device
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    if isinstance(example, dict):
        return model(**{k: move(v) for k, v in example.items()})
    if isinstance(example, (tuple, list)):
        return model(*[move(x) for x in example])
    return model(move(example))


def finetune(model, data: Iterable, steps: int, *, lr: float = 1e-3, model_lr: float = 2e-5, lam: float = 1.0,
             task_loss: Optional[Callable] = None, train_model: bool = False, progress: bool = True,
             train_mode: bool = True) -> list[float]:
    """Train ``model`` (converted) for ``steps`` steps cycling over ``data`` (examples as for ``convert``).

    ``task_loss(output, example) -> tensor`` adds the task term; without it only the Eq. 8 term trains.
    ``train_mode=False`` runs the steps in eval mode (no dropout; calibration uses it). Returns the loss of
    every step; the model is left in eval mode.
    """
    examples = list(data)
    if not examples:
        raise ValueError("finetune: no training examples")
    projections = [m for m in model.modules() if isinstance(m, SFAProjection) and m.weight is not None]
    if not projections and not train_model:
        raise ValueError("finetune: the model has no run-time projections to train (folded or not converted); "
                         "pass train_model=True to train its weights")
    projection_params = {id(p) for m in projections for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in projection_params]
    own, frozen = (trainable, []) if train_model else ([], trainable)
    for p in frozen:
        p.requires_grad_(False)
    model.train(train_mode)
    losses = []
    try:
        with orthogonal_training(projections) as proj_params:
            groups = [{"params": proj_params, "lr": lr}] if proj_params else []
            if own:
                groups.append({"params": own, "lr": model_lr})
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            runner = model
            if dist.is_available() and dist.is_initialized():
                runner = torch.nn.parallel.DistributedDataParallel(model)
            batches = itertools.cycle(examples)
            for _ in progress_bar(range(steps), "fine-tuning", progress):
                example = next(batches)
                with attention_distillation() as distill:
                    out = call_model(runner, example)
                    loss = lam * distill.loss()
                if task_loss is not None:
                    loss = loss + task_loss(out, example)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    return losses
