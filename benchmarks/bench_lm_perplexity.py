"""Causal LM check: a small GPT-2-shaped model trained from scratch, dense attention vs SFA at topk = d/8.

Corpus: the English reference text that ships with every CPython (``pydoc_data.topics``, ~466 KB), as bytes
(vocabulary 256, so no tokenizer download); the last 10% is held out. Both models start from the same
initialization and see the same batches in the same order; the SFA one is converted before training with
``sfa_compile.convert`` (plain top-k: identity projection, nothing calibrated) and trains through FlashSFA's
forward and backward. Reported: held-out perplexity per byte and bits per byte after the same number of
steps (the paper: 17.29 dense vs 18.27 SFA at GPT-2 scale on OpenWebText, per token), and the loss on the
first held-out-sized slice of the training text (how much each model memorized: the corpus is small, so
long runs are many epochs). The trained SFA model is also read the way generation reads it: each held-out window
one byte at a time through ``SFACache`` under bf16 autocast, its values cached in bf16 and then in FP8
(``value_dtype=torch.float8_e4m3fn``), so every prediction attends over the compressed cache.

    python benchmarks/bench_lm_perplexity.py [--steps 1000] [--layers 6] [--width 384] [--heads 6]
                                                [--out DIR] [--publish]
"""

import argparse
import copy
import math
import platform
import time
from pydoc_data.topics import topics

import torch
import transformers
from publish import Report, add_arguments, provenance

import sfa_compile
from sfa_compile import SFACache


def corpus(device):
    text = "\n\n".join(topics[k] for k in sorted(topics)).encode()
    data = torch.tensor(list(text), dtype=torch.long, device=device)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def batch(data, size, length, generator):
    starts = torch.randint(0, len(data) - length - 1, (size,), generator=generator)
    rows = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def windows(data, length, batch_size):
    """Batches of consecutive, non-overlapping (length + 1)-byte windows of ``data``: inputs and next bytes."""
    starts = list(range(0, len(data) - length - 1, length))
    for i in range(0, len(starts), batch_size):
        yield torch.stack([data[s:s + length + 1] for s in starts[i:i + batch_size]])


@torch.no_grad()
def held_out_loss(model, data, length, batch_size=32):
    model.eval()
    total, count = 0.0, 0
    for rows in windows(data, length, batch_size):
        logits = model(input_ids=rows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + rows[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def held_out_loss_decoding(model, data, length, value_dtype=None, batch_size=256):
    """``held_out_loss`` with every window read one byte at a time through an ``SFACache`` (values in
    ``value_dtype``, default the autocast dtype), under bf16 autocast on CUDA: what generation computes."""
    from bench_generate import cache_kwarg

    model.eval()
    total, count = 0.0, 0
    device = data.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for rows in windows(data, length, batch_size):
            cache = SFACache(model, value_dtype=value_dtype)
            for t in range(length):
                logits = model(input_ids=rows[:, t:t + 1], **cache_kwarg(model, cache), use_cache=True).logits
                loss = torch.nn.functional.cross_entropy(logits[:, -1].float(), rows[:, t + 1], reduction="sum")
                total, count = total + loss.item(), count + rows.size(0)
    model.train()
    return total / count


def train(model, data, steps, batch_size, length, lr, seed, make_batch=batch):
    """AdamW with warm-up and cosine decay over ``steps`` batches of ``make_batch``, bf16 autocast on CUDA."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for _ in range(steps):
        x, y = make_batch(data, batch_size, length, generator)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return loss.item()


def add_model_arguments(parser) -> None:
    """The GPT-2 shape and the pretraining batch and learning rate."""
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)


def byte_gpt2(args, device):
    """A freshly initialized (seed 0), dropout-free byte-level GPT-2 of ``add_model_arguments``'s shape."""
    config = transformers.GPT2Config(vocab_size=256, n_positions=args.length, n_embd=args.width,
                                     n_layer=args.layers, n_head=args.heads, attn_implementation="sdpa",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)  # bytes: GPT-2's token 50256 is outside the vocabulary
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="1000: the best held-out point on this corpus")
    add_model_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_data, held_out = corpus(device)
    head_dim = args.width // args.heads
    dense = byte_gpt2(args, device)
    sfa = sfa_compile.convert(copy.deepcopy(dense), sfa_compile.SFAConfig(topk=head_dim // 8), progress=False)
    epochs = args.steps * args.batch * args.length / len(train_data)
    report = Report("bench_lm_perplexity", "Causal LM from scratch: dense vs SFA at topk = d/8 "
                    "(benchmarks/bench_lm_perplexity.py)", args)
    report.line(f"{provenance(torch.cuda.get_device_name() if device == 'cuda' else platform.machine())}, Python "
                f"{platform.python_version()}; GPT-2 shape {args.layers} layers x {args.width} wide, "
                f"{args.heads} heads of {head_dim}, byte-level, {len(train_data)} train / {len(held_out)} held-out "
                f"bytes, {args.steps} steps of {args.batch} x {args.length} ({epochs:.1f} epochs)")
    report.line()
    report.line("| attention | held-out loss (nats/byte) | perplexity per byte | bits per byte | train-slice loss "
                "| train s |")
    report.line("|---|---|---|---|---|---|")
    for name, model in (("dense (SDPA)", dense), (f"SFA topk {head_dim // 8}", sfa)):
        start = time.time()
        train(model, train_data, args.steps, args.batch, args.length, args.lr, seed=1)
        seconds = time.time() - start
        loss = held_out_loss(model, held_out, args.length)
        seen = held_out_loss(model, train_data[:len(held_out)], args.length)
        report.row(dict(attention=name, held_out_loss=loss, train_slice_loss=seen, seconds=round(seconds, 1)),
                   f"| {name} | {loss:.4f} | {math.exp(loss):.3f} | {loss / math.log(2):.3f} | {seen:.4f} "
                   f"| {seconds:.0f} |")
    decoded = {}
    plain = "bf16" if device == "cuda" else "float32"  # the autocast dtype, or none on the CPU
    for values, value_dtype in ((plain, None), ("FP8", torch.float8_e4m3fn)):
        name = f"SFA topk {head_dim // 8}, decoding through SFACache, {values} values"
        loss = decoded[values] = held_out_loss_decoding(sfa, held_out, args.length, value_dtype)
        report.row(dict(attention=name, held_out_loss=loss), f"| {name} | {loss:.4f} | {math.exp(loss):.3f} "
                                                             f"| {loss / math.log(2):.3f} | | |")
    report.line()
    report.line(f"- Perplexity with FP8 values vs {plain} values (decoding): "
                f"{100 * (math.exp(decoded['FP8'] - decoded[plain]) - 1):+.3f}%")
    report.finish()


if __name__ == "__main__":
    main()
