"""Convert a small causal LM to SFA, calibrate its projections, fine-tune with the paper's Eq. 8, save, reload.

Random weights from a config (no downloads); the text is sfa_compile's built-in sentences. Runs on a CPU in
about a minute. Under torchrun the same loop runs data-parallel: DDP by default, FSDP2 with ``--fsdp`` (the
projections R stay whole), NCCL with one GPU per process where CUDA is present, gloo on CPUs otherwise; each
process trains on its own share of the batches, and rank 0 saves the checkpoint (gathered from the shards under
FSDP2) and checks that it reloads.

    python examples/finetune.py [--steps 50] [--topk 4] [--out /tmp/sfa-llama]
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 examples/finetune.py [--fsdp]
"""

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import sfa_compile
from sfa_compile.conversion.textdata import builtin_sentences


def batches(sentences, vocab, size=8, length=32):
    """Byte-level token ids of the sentences (no tokenizer download needed), as LM batches."""
    out = []
    for i in range(0, len(sentences), size):
        ids = torch.zeros(len(sentences[i:i + size]), length, dtype=torch.long)
        for row, text in enumerate(sentences[i:i + size]):
            data = list(text.encode()[:length])
            ids[row, :len(data)] = torch.tensor(data) % vocab
        out.append({"input_ids": ids, "labels": ids})
    return out


def start_processes() -> torch.device:
    """Join torchrun's process group (NCCL on this process's GPU, gloo without CUDA); the device to train on."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def shard_with_fsdp2(model) -> None:
    """FSDP2 over each decoder block, then the whole model; the projections R stay whole (the orthogonal
    parametrization needs whole matrices)."""
    from torch.distributed.fsdp import fully_shard

    whole = sfa_compile.projection_parameters(model)
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h  # Llama-like / GPT-2
    for block in blocks:
        fully_shard(block, ignored_params=whole)
    fully_shard(model, ignored_params=whole)


def full_state(model) -> dict:
    """The model's parameters and buffers as whole CPU tensors on every process (gathered from FSDP2 shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--out", default="/tmp/sfa-llama")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2, not DDP")
    args = parser.parse_args()
    device = start_processes()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)  # the same weights on every process
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=256)
    model = transformers.LlamaForCausalLM(config).to(device)
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(builtin_sentences()[:256], config.vocab_size)]
    sfa_config = sfa_compile.SFAConfig(topk=args.topk)
    sfa_compile.convert(model, sfa_config, calibration=data[:8], progress=rank == 0)
    if args.fsdp and world > 1:
        shard_with_fsdp2(model)
    losses = sfa_compile.finetune(model, data[rank::world], args.steps, task_loss=lambda out, batch: out.loss,
                                  train_model=True, model_lr=1e-3, progress=rank == 0)
    state = full_state(model) if world > 1 else None  # a collective: every process takes part
    if rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps on {world} process(es), {device}")
        if state is not None:  # an unsharded copy holds the trained weights for saving
            model = sfa_compile.convert(transformers.LlamaForCausalLM(config), sfa_config, progress=False)
            model.load_state_dict(state)
            model.to(device)
        sfa_compile.save(model, args.out, force=True)
        reloaded = sfa_compile.load(args.out).to(device)
        with torch.no_grad():
            same = torch.allclose(reloaded(**data[0]).logits, model(**data[0]).logits, atol=1e-5)
        print(f"saved to {args.out}; reloaded model matches: {same}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
