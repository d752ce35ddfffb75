"""Convert a small causal LM to SFA, calibrate its projections, fine-tune with the paper's Eq. 8, save, reload.

Random weights from a config (no downloads); the text is sfa_compile's built-in sentences. Runs on a CPU in
about a minute; under `torchrun --nproc_per_node 2 examples/finetune.py` the same loop runs with DDP.

    python examples/finetune.py [--steps 50] [--topk 4] [--out /tmp/sfa-llama]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--out", default="/tmp/sfa-llama")
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=256)
    model = transformers.LlamaForCausalLM(config)
    data = batches(builtin_sentences()[:256], config.vocab_size)
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=args.topk), calibration=data[:8])
    losses = sfa_compile.finetune(model, data, args.steps, task_loss=lambda out, batch: out.loss, train_model=True,
                                  lam=1.0, model_lr=1e-3)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
        sfa_compile.save(model, args.out, force=True)
        reloaded = sfa_compile.load(args.out)
        with torch.no_grad():
            same = torch.allclose(reloaded(**data[0]).logits, model(**data[0]).logits, atol=1e-5)
        print(f"saved to {args.out}; reloaded model matches: {same}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
