"""Fine-tuning a converted model with the paper's Eq. 8: L = L_task + lambda * distillation.

A plain PyTorch loop. It trains the projections R (kept orthogonal) and, with ``train_model``, the model's
own weights. Three optional levers make top-k itself learnable (all measured on all-MiniLM-L6-v2 at topk 8,
benchmarks/RESULTS.md): straight-through top-k gradients (straight_through.py), a penalty on the energy top-k
drops (distill.py), and gradual sparsification (the first stages run at larger top-k values) with the learning
rates lowered for the last quarter of the steps.

Under ``torchrun`` (torch.distributed initialized) the model is wrapped in DistributedDataParallel after the
projections are parametrized, so every process holds the same R. A model already sharded with FSDP2
(``fully_shard``) is trained as it is; its projections must stay unsharded (``fully_shard(...,
ignored_params=projection_parameters(model))``: the orthogonal parametrization needs whole matrices) and their
gradients are averaged over the processes here.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..projection import SFAProjection, orthogonal_training, projection_parameters
from .distill import attention_distillation
from .model_call import call_model, check_examples, trains
from .progress import progress_bar
from .straight_through import straight_through_topk


class _TrainingStep(torch.nn.Module):
    """The model plus its loss (Eq. 8 term and task term) as one module whose output is the loss, so that
    DistributedDataParallel sees which parameters reach it."""

    def __init__(self, model, lam: float, task_loss: Optional[Callable], anchor_output: bool = False,
                 sparsity_weight: float = 0.0, straight_through: bool = False):
        super().__init__()
        self.model, self.lam, self.task_loss, self.anchor_output = model, lam, task_loss, anchor_output
        self.sparsity_weight, self.straight_through = sparsity_weight, straight_through

    def forward(self, example):
        sparsity = self.sparsity_weight > 0
        with attention_distillation(self.model, sparsity) as distill, \
                straight_through_topk(self.model) if self.straight_through else contextlib.nullcontext():
            out = call_model(self.model, example)
            loss = self.lam * distill.loss()
            if sparsity:
                loss = loss + self.sparsity_weight * distill.dropped_energy()
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


def _topk_stages(layers: list, warmup_topks: Sequence[int], steps: int) -> list[int]:
    """The top-k of every step: each warm-up value for steps // (len(warmup_topks) + 2) steps, then the layers'
    own (checked: warm-up values lie above every layer's top-k and at most its head dim)."""
    if not warmup_topks:
        return []
    if not layers:
        raise ValueError("finetune: warmup_topks needs SFA layers; is the model converted?")
    low, high = max(m.topk for m in layers), min(m.head_dim for m in layers)
    for k in warmup_topks:
        if isinstance(k, bool) or not isinstance(k, int) or not low < k <= high:
            raise ValueError(f"finetune: warmup_topks must be integers above the model's topk ({low}) and at most "
                             f"its head dim ({high}), got {k!r}")
    share = steps // (len(warmup_topks) + 2)
    if share == 0:
        raise ValueError(f"finetune: {len(warmup_topks)} warm-up top-k values need at least "
                         f"{len(warmup_topks) + 2} steps, got {steps}")
    return [k for k in warmup_topks for _ in range(share)]


# Eq. 8's weight beside a task loss: the task leads, Eq. 8 only regularizes (bench_convert_lm, benchmarks/LOG.md).
DISTILL_WEIGHT_WITH_TASK = 0.01


@trains
def finetune(model, data: Iterable, steps: int, *, lr: float = 1e-3, model_lr: float = 2e-5,
             lam: Optional[float] = None, task_loss: Optional[Callable] = None, train_model: bool = False,
             progress: bool = True, train_mode: bool = True, straight_through: bool = False,
             sparsity_weight: float = 0.0, warmup_topks: Sequence[int] = (),
             final_lr_factor: float = 1.0) -> list[float]:
    """Train ``model`` (converted) for ``steps`` steps cycling over ``data`` (examples as for ``convert``).

    ``task_loss(output, example) -> tensor`` adds the task term; without it only the Eq. 8 term trains. ``lam``
    weighs the Eq. 8 term: by default 0.01 beside a task loss (``DISTILL_WEIGHT_WITH_TASK``), 1.0 alone.
    ``train_mode=False`` runs the steps in eval mode (no dropout; calibration uses it).
    ``straight_through``: dropped features get the gradient they would get if kept (forward unchanged).
    ``sparsity_weight``: weight of the dropped-energy penalty. ``warmup_topks`` (e.g. (16, 12) for topk 8):
    the first steps run at these larger top-k values, each for steps // (len + 2) steps, the rest at the
    model's own. ``final_lr_factor``: both learning rates are multiplied by it for the last quarter of the
    steps. Returns the loss of every step; the model is left in eval mode with its own top-k.
    """
    if lam is None:
        lam = DISTILL_WEIGHT_WITH_TASK if task_loss is not None else 1.0
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune: steps must be an integer >= 0, got {steps!r}")
    examples = list(data)
    if not examples:
        raise ValueError("finetune: no training examples")
    check_examples(examples, "finetune", "data")
    if not sparsity_weight >= 0.0 or not final_lr_factor > 0.0:
        raise ValueError(f"finetune: sparsity_weight must be >= 0 and final_lr_factor > 0, got {sparsity_weight} "
                         f"and {final_lr_factor}")
    for name, value in (("lam", lam), ("lr", lr), ("model_lr", model_lr)):
        if not 0.0 <= value < float("inf"):  # NaN fails too
            raise ValueError(f"finetune: {name} must be a finite number >= 0, got {value}")
    layers = [m for m in model.modules() if isinstance(m, SFAProjection)]
    stages = _topk_stages(layers, tuple(warmup_topks), steps)
    own_topk = [m.topk for m in layers]
    projections = [m for m in layers if m.weight is not None]
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
            decay_from = steps - steps // 4
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: final_lr_factor if i >= decay_from else 1.0)
            step = _TrainingStep(model, lam, task_loss, anchor_output=sharded, sparsity_weight=sparsity_weight,
                                 straight_through=straight_through)
            distributed = dist.is_available() and dist.is_initialized()
            if distributed and not sharded:
                # Trained model weights need not all reach the loss (Eq. 8 alone never reaches the last MLP).
                step = torch.nn.parallel.DistributedDataParallel(step, find_unused_parameters=train_model)
            batches = itertools.cycle(examples)
            for i in progress_bar(range(steps), "fine-tuning", progress):
                for m, k in zip(layers, own_topk):
                    m.topk = stages[i] if i < len(stages) else k
                loss = step(next(batches))
                opt.zero_grad()
                loss.backward()
                if distributed and sharded:
                    _average_gradients(proj_params)
                opt.step()
                # An enclosing autocast keeps its casts of the weights until its block ends: drop the stale ones.
                torch.clear_autocast_cache()
                schedule.step()
                losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m, k in zip(layers, own_topk):
            m.topk = k
    model.eval()
    return losses
