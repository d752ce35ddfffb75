"""Fine-tuning a converted model with the paper's Eq. 8: L = L_task + lambda * distillation.

A plain PyTorch loop. It trains the projections R (kept orthogonal) and, with ``train_model``, the model's
own weights. Under ``torchrun`` (torch.distributed initialized) the model is wrapped in
DistributedDataParallel after the projections are parametrized, so every process holds the same R. A model
already sharded with FSDP2 (``fully_shard``) is trained as it is; its projections must stay unsharded
(``fully_shard(..., ignored_params=projection_parameters(model))``: the orthogonal parametrization needs
whole matrices) and their gradients are averaged over the processes here.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .distill import attention_distillation
from .progress import progress_bar
from .projection import SFAProjection, orthogonal_training, projection_parameters


def call_model(model, example):
    """Run ``model`` on one example: a dict of keyword arguments, a tuple of positional ones, or a tensor."""
    device = next(model.parameters()).device
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    if isinstance(example, dict):
        return model(**{k: move(v) for k, v in example.items()})
    if isinstance(example, (tuple, list)):
        return model(*[move(x) for x in example])
    return model(move(example))


class _TrainingStep(torch.nn.Module):
    """The model plus its loss (Eq. 8 term and task term) as one module whose output is the loss, so that
    DistributedDataParallel sees which parameters reach it."""

    def __init__(self, model, lam: float, task_loss: Optional[Callable], anchor_output: bool = False):
        super().__init__()
        self.model, self.lam, self.task_loss, self.anchor_output = model, lam, task_loss, anchor_output

    def forward(self, example):
        with attention_distillation() as distill:
            out = call_model(self.model, example)
            loss = self.lam * distill.loss()
        if self.task_loss is not None:
            loss = loss + self.task_loss(out, example)
        if self.anchor_output:
            # FSDP2 re-gathers a module's weights for the backward when gradients reach its output; the Eq. 8
            # term reaches attention inside a layer but not the layer's output, so tie the output in at weight 0.
            values = [out] if torch.is_tensor(out) else out.values() if isinstance(out, dict) else out
            anchor = next(v for v in values if torch.is_tensor(v)).sum().nan_to_num(0.0, 0.0, 0.0)  # inf * 0 = NaN
            loss = loss + 0.0 * anchor
        return loss


def _is_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch builds without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _average_gradients(params) -> None:
    """Mean of each gradient over the processes (FSDP2 leaves the unsharded projections to us)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


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
    projection_params = {id(p) for p in projection_parameters(model)}
    sharded = _is_fsdp2(model)
    if sharded and any(_is_dtensor(m.weight) for m in projections):
        raise ValueError("finetune: the SFA projections were sharded by FSDP2; keep them whole with "
                         "fully_shard(module, ignored_params=sfa_compile.projection_parameters(model))")
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
            step = _TrainingStep(model, lam, task_loss, anchor_output=sharded)
            distributed = dist.is_available() and dist.is_initialized()
            if distributed and not sharded:
                # Trained model weights need not all reach the loss (Eq. 8 alone never reaches the last MLP).
                step = torch.nn.parallel.DistributedDataParallel(step, find_unused_parameters=train_model)
            batches = itertools.cycle(examples)
            for _ in progress_bar(range(steps), "fine-tuning", progress):
                loss = step(next(batches))
                opt.zero_grad()
                loss.backward()
                if distributed and sharded:
                    _average_gradients(proj_params)
                opt.step()
                losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    return losses
