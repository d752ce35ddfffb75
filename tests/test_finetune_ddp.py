"""Fine-tuning under DistributedDataParallel: 2 CPU processes on the gloo backend."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_models import build

import sfa_compile


def _worker(rank: int, world: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, inputs, _, _ = build("llama", "eager")  # same seed -> same weights on every rank
        sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [inputs], progress=False)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        data = [{"input_ids": torch.randint(0, 100, (2, 9), generator=gen)} for _ in range(3)]
        projections = lambda: torch.stack([layer.self_attn.sfa.weight.detach().clone()  # noqa: E731
                                           for layer in model.model.layers])
        before = projections()
        losses = sfa_compile.finetune(model, data, 3, lr=1e-2, progress=False)
        weights = projections()
        gathered = [torch.empty_like(weights) for _ in range(world)]
        dist.all_gather(gathered, weights)
        results[rank] = (torch.stack(gathered), before, losses)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_keep_projections_in_sync():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    gathered, before, losses = results[0]
    assert not torch.allclose(gathered[0], before, atol=1e-4)  # training moved R (from different data per rank)
    assert torch.equal(gathered[0], gathered[1])  # DDP averaged the gradients: one R everywhere
    eye = torch.eye(gathered.size(-1))
    assert (gathered[0].transpose(-1, -2) @ gathered[0] - eye).abs().max() < 1e-4  # still orthogonal
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
