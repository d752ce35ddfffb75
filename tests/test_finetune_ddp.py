"""Distributed fine-tuning with 2 CPU processes on the gloo backend: DDP, and FSDP2 where torch provides it."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_models import build

import sfa_compile

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = None


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, port: int, mode: str, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, inputs, _, _ = build("llama", "eager")  # same seed -> same weights on every rank
        sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [inputs], progress=False)
        before = torch.stack([layer.self_attn.sfa.weight.detach().clone() for layer in model.model.layers])
        if mode == "fsdp2":
            keep_whole = sfa_compile.projection_parameters(model)
            for layer in model.model.layers:
                fully_shard(layer, ignored_params=keep_whole)
            fully_shard(model, ignored_params=keep_whole)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        data = [{"input_ids": torch.randint(0, 100, (2, 9), generator=gen)} for _ in range(3)]
        losses = sfa_compile.finetune(model, data, 3, lr=1e-2, model_lr=1e-3, train_model=True, progress=False)
        weights = torch.stack([layer.self_attn.sfa.weight.detach().clone() for layer in model.model.layers])
        gathered = [torch.empty_like(weights) for _ in range(world)]
        dist.all_gather(gathered, weights)
        model_weights = {name: _full(p.detach()).clone() for name, p in model.named_parameters()}
        results[rank] = (torch.stack(gathered), before, losses, model_weights)
    finally:
        dist.destroy_process_group()


def _run(mode: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, mode, results), nprocs=2, join=True)
    return results[0], results[1]


def _check_synced_projections(first, second):
    gathered, before, losses, _ = first
    assert not torch.allclose(gathered[0], before, atol=1e-4)  # training moved R (from different data per rank)
    assert torch.equal(gathered[0], gathered[1])  # gradients averaged: one R everywhere
    eye = torch.eye(gathered.size(-1))
    assert (gathered[0].transpose(-1, -2) @ gathered[0] - eye).abs().max() < 1e-4  # still orthogonal
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, value in first[3].items():
        torch.testing.assert_close(value, second[3][name], rtol=0, atol=0)  # the same model on both ranks


def test_ddp_two_processes_keep_projections_in_sync():
    _check_synced_projections(*_run("ddp"))


@pytest.mark.skipif(fully_shard is None, reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
def test_fsdp2_two_processes_train_like_ddp():
    fsdp = _run("fsdp2")
    _check_synced_projections(*fsdp)
    (fsdp_r, _, fsdp_losses, fsdp_weights), (ddp_r, _, ddp_losses, ddp_weights) = fsdp[0], _run("ddp")[0]
    torch.testing.assert_close(fsdp_r, ddp_r, rtol=1e-4, atol=1e-5)  # the same R as DDP
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(ddp_losses), rtol=1e-4, atol=1e-5)
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, value in ddp_weights.items():  # and the same model weights
        torch.testing.assert_close(fsdp_weights[name], value, rtol=1e-4, atol=1e-5)
