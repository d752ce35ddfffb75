"""Data-parallel fine-tuning of a converted model across GPUs (torchrun; DDP and FSDP2 on NCCL): equality and speed.

For each mode (DDP, FSDP2 with the projections R kept whole) and each GPU count that fits the machine (--gpus),
the script launches itself under ``torchrun --standalone --nproc-per-node N`` with NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, and:
  check   fine-tunes a small converted Llama (fp32, TF32 off) for a few steps with every process on its own batches,
          then rank 0 runs the same steps in one process on the global batches (each step's batches of all ranks
          concatenated) and reports the largest differences of the losses, the final R and the model weights,
          and whether R is still orthogonal (N >= 2 only);
  speed   fine-tunes a GPT-2-small-shaped converted model (topk 16 of 64, run-time R, bf16 autocast, Eq. 8 + LM
          loss, model weights and R trained) and reports tokens/s over the timed steps after a warm-up.
Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU), per-GPU batch fixed. Without CUDA the workers
run on CPU processes with gloo (a smoke test of the same code).

    python benchmarks/bench_finetune_multigpu.py [--gpus 1 2 4 8] [--modes ddp fsdp2] [--steps 20]
                                                 [--out DIR] [--publish]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from publish import Report, add_arguments, provenance

import sfa_compile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from finetune import full_state, shard_with_fsdp2, start_processes  # noqa: E402  (the example's distributed set-up)

RESULT = "RESULT "


def small_llama(device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=256)
    model = transformers.LlamaForCausalLM(config).to(device)
    calibration = [{"input_ids": torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1)).to(device)}]
    return sfa_compile.convert(model, sfa_compile.SFAConfig(topk=8), calibration, refine_steps=20, progress=False)


def step_batches(steps: int, world: int, size: int, length: int, vocab: int, device):
    """[step][rank] batches of LM examples, the same on every process."""
    g = torch.Generator().manual_seed(7)
    made = [[torch.randint(0, vocab, (size, length), generator=g) for _ in range(world)] for _ in range(steps)]
    return [[{"input_ids": x.to(device), "labels": x.to(device)} for x in ranks] for ranks in made]


def tune(model, examples, steps):
    return sfa_compile.finetune(model, examples, steps, task_loss=lambda out, batch: out.loss, train_model=True,
                                lam=1.0, lr=1e-2, model_lr=1e-3, progress=False)


def projections(state: dict) -> torch.Tensor:
    return torch.stack([v for k, v in sorted(state.items()) if k.endswith("sfa.weight")])


def check_worker(mode: str, device, steps: int) -> dict:
    """Distributed run, then (rank 0) the same steps in one process on the global batches."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rank, world = dist.get_rank(), dist.get_world_size()
    model = small_llama(device)
    batches = step_batches(steps, world, 2, 48, 256, device)
    if mode == "fsdp2" and dist.get_world_size() > 1:
        shard_with_fsdp2(model)
    losses = torch.tensor(tune(model, [b[rank] for b in batches], steps), device=device)
    dist.all_reduce(losses)  # the global batch's loss is the mean of the ranks' (equal-sized) losses
    state = full_state(model)
    dist.destroy_process_group()
    if rank != 0:
        return {}  # rank 0 alone compares with the one-process run
    single = small_llama(device)
    single_losses = tune(single, [{k: torch.cat([b[k] for b in ranks]) for k in ranks[0]} for ranks in batches],
                         steps)
    reference = {k: v.detach().cpu() for k, v in single.state_dict().items()}
    r = projections(state)
    eye = torch.eye(r.size(-1))
    return dict(loss_diff=(losses.cpu() / world - torch.tensor(single_losses)).abs().max().item(),
                r_diff=(r - projections(reference)).abs().max().item(),
                weight_diff=max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items()),
                orthogonality=(r.transpose(-1, -2) @ r - eye).abs().max().item())


def speed_worker(mode: str, device, steps: int, warmup: int, batch: int, length: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=length, vocab_size=50257,
                                     attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).to(device)
    g = torch.Generator().manual_seed(100 + rank)
    data = [{"input_ids": (x := torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)),
             "labels": x} for _ in range(4)]
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=16), data[:1], refine_steps=0, fold=False, progress=False)
    if mode == "fsdp2" and dist.get_world_size() > 1:
        shard_with_fsdp2(model)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tune(model, data, warmup)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        tune(model, data, steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    return dict(tokens_per_s=world * batch * length * steps / seconds, seconds=seconds)


def launch(gpus: int, args, job: str, mode: str) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__,
               "--worker", job, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch),
               "--length", str(args.length)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{job} {mode} on {gpus}: torchrun failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--worker", choices=["check", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        device = start_processes()
        result = (check_worker(args.mode, device, 3) if args.worker == "check"
                  else speed_worker(args.mode, device, args.steps, 3, args.batch, args.length))
        if os.environ["RANK"] == "0":  # one line from one process (the others' would interleave with it)
            print(RESULT + json.dumps(result), flush=True)
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 2
    counts = [n for n in args.gpus if n <= available]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()}, gloo)"
    report = Report("bench_finetune_multigpu", "Fine-tuning across GPUs: DDP and FSDP2 "
                    "(benchmarks/bench_finetune_multigpu.py)", args)
    report.line(f"{provenance(device)}; {available} device(s); GPT-2-small shape converted at topk 16 (run-time R), "
                f"bf16 autocast, {args.batch} x {args.length} tokens per GPU per step, {args.steps} timed steps; "
                "check: a 2-layer Llama in fp32, 3 steps, distributed vs one process on the global batches")
    report.line()
    report.line("| mode | GPUs | tokens/s | per GPU | scaling efficiency | max loss diff | max R diff "
                "| max weight diff | R orthogonality error |")
    report.line("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        single = None
        for n in counts:
            speed = launch(n, args, "speed", mode)
            check = launch(n, args, "check", mode) if n > 1 else {}
            single = speed["tokens_per_s"] if n == 1 else single
            efficiency = speed["tokens_per_s"] / (n * single) if single else None  # needs the 1-GPU run
            cells = [f"{check[k]:.1e}" if k in check else "-" for k in ("loss_diff", "r_diff", "weight_diff",
                                                                         "orthogonality")]
            report.row(dict(mode=mode, gpus=n, **speed, efficiency=efficiency, **check),
                       f"| {mode} | {n} | {speed['tokens_per_s']:.0f} | {speed['tokens_per_s'] / n:.0f} "
                       f"| {'-' if efficiency is None else f'{efficiency:.0%}'} | " + " | ".join(cells) + " |")
    skipped = [n for n in args.gpus if n > available]
    if skipped:
        report.line()
        report.line(f"Not run: {', '.join(map(str, skipped))} GPUs (this machine has {available}).")
    report.finish()


if __name__ == "__main__":
    main()
