"""Does SFA keep a learned retrieval? Key-value recall in a small causal LM, dense vs converted vs trained as SFA.

A byte-level GPT-2-shaped model is trained densely on recall rows only ("Keys: " + 8 pair bytes + English filler
text + " Recall: A3 K1 C7 ..."), the LM loss on every byte. Each pair byte (a value above 127, which the English
text does not hold) stands for one letter and its digit, so each digit after a recalled letter can only be found by
attending from the letter back to its pair byte across the filler: a lookup one attention layer can hold. (Mixed
into the pretraining of bench_convert_lm.py's larger model, such rows were not learned within its budget; this
model does nothing else.) Then, per topk (d/4 and d/8 by default), on copies of the trained model:
  plain       ``convert(model, SFAConfig(topk))``: R = identity;
  calibrated  ``convert(..., calibration=recall batches)``: the conversion defaults;
  + fine-tune the calibrated model trained on the LM loss with ``finetune``'s defaults beside a task loss, for
              ``--finetune-steps`` (default 10% of the training steps);
  scratch     an SFA model of the same initialization trained for training + fine-tuning steps.
Reported: recall accuracy (share of recalled digits that are the model's argmax given the true bytes before them;
chance 10%) at each filler distance, and the seconds each variant took.

    python benchmarks/bench_convert_recall.py [--steps 6000] [--finetune-steps 600] [--topks 16 8]
                                              [--layers 2] [--width 128] [--heads 2] [--out DIR] [--publish]
"""

import argparse
import copy
import platform
import time

import torch
from bench_convert_lm import (
    add_conversion_arguments,
    conversion_settings,
    conversion_variants,
    english_corpus,
    examples,
)
from bench_lm_perplexity import byte_gpt2, train
from publish import Report, add_arguments, provenance

RECALL_PAIRS, RECALL_LETTERS = 8, 12  # pairs per recall row, drawn from the letters A to L
PAIR_BYTE = 128  # pair byte = PAIR_BYTE + 10 * letter + digit: one token holds a key and its value
KEYS, RECALL = "Keys: ", " Recall: "
RECALL_BYTES = len(KEYS) + len(RECALL) + 5 * RECALL_PAIRS  # a pair byte and a space; letter, digit, space


def recall_row(data, length, distance, generator):
    """(bytes, positions of the recalled digits): pair bytes of distinct letters with random digits, ``distance``
    bytes of corpus filler, the letters in another order each followed by its digit, more filler to ``length`` + 1
    bytes."""
    letters = torch.randperm(RECALL_LETTERS, generator=generator)[:RECALL_PAIRS].tolist()
    digits = torch.randint(0, 10, (RECALL_PAIRS,), generator=generator).tolist()
    order = torch.randperm(RECALL_PAIRS, generator=generator).tolist()
    start = torch.randint(0, len(data) - length - 1, (1,), generator=generator).item()
    filler = data[start:start + length + 1].tolist()
    keys = [byte for letter, digit in zip(letters, digits) for byte in (PAIR_BYTE + 10 * letter + digit, ord(" "))]
    head = list(KEYS.encode()) + keys + filler[:distance] + list(RECALL.encode())
    targets = [len(head) + 3 * i + 1 for i in range(RECALL_PAIRS)]
    recalled = "".join(f"{chr(65 + letters[i])}{digits[i]} " for i in order)
    row = head + list(recalled.encode()) + filler[distance:]
    return row[:length + 1], targets


def recall_batch(data, size, length, generator):
    """``size`` recall rows at random filler distances: inputs and next bytes."""
    rows = []
    for _ in range(size):
        distance = torch.randint(0, length - RECALL_BYTES + 1, (1,), generator=generator).item()
        rows.append(recall_row(data, length, distance, generator)[0])
    rows = torch.tensor(rows, device=data.device)
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def recall_accuracy(model, data, length, distance, rows=128) -> float:
    """Share of recalled digits that are the model's argmax, each given the true bytes before it."""
    generator = torch.Generator().manual_seed(distance)
    made = [recall_row(data, length, distance, generator) for _ in range(rows)]
    ids = torch.tensor([r for r, _ in made], device=data.device)
    predicted = model(input_ids=ids[:, :-1]).logits.argmax(-1)
    targets = torch.tensor([t for _, t in made], device=data.device)
    return (predicted.gather(1, targets - 1) == ids.gather(1, targets)).float().mean().item()


def plot_recall(figure, rows) -> None:
    """Recall accuracy at the longest distance, per variant and topk, dense as a dashed line, chance dotted."""
    axes = figure.add_subplot(1, 1, 1)
    key = [k for k in rows[0] if k.startswith("recall_")][-1]
    dense = next(r[key] for r in rows if not r["topk"])
    variants = list(dict.fromkeys(r["model"] for r in rows if r["topk"]))
    for topk in dict.fromkeys(r["topk"] for r in rows if r["topk"]):
        accuracy = {r["model"]: r[key] for r in rows if r["topk"] == topk}
        axes.plot(variants, [accuracy.get(v) for v in variants], marker="o", label=f"SFA topk {topk}")
    axes.axhline(dense, linestyle="--", color="gray", label="dense")
    axes.axhline(0.1, linestyle=":", color="black", label="chance")
    axes.set_ylim(0, 1.02)
    axes.set_ylabel(f"recall accuracy, {key.split('_')[1]} filler bytes")
    axes.set_title("Key-value recall: dense vs SFA by method", fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(True, alpha=0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_conversion_arguments(parser, steps=6000)
    parser.set_defaults(layers=2, width=128, heads=2, lr=3e-3)  # the shape and rate seen to learn the lookup
    parser.add_argument("--docstring-bytes", type=int, default=None, help="cap on the filler text (default: all)")
    parser.add_argument("--distances", type=int, nargs="+", default=[16, 96, 176],
                        help=f"filler bytes between a recall row's keys and recall (at most length - {RECALL_BYTES})")
    add_arguments(parser)
    args = parser.parse_args()
    if max(args.distances) > args.length - RECALL_BYTES:
        parser.error(f"--distances: at most {args.length - RECALL_BYTES} filler bytes fit in --length {args.length}")
    if args.width % args.heads:
        parser.error(f"--heads {args.heads} must divide --width {args.width}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head_dim, topks, finetune_steps = conversion_settings(args)
    train_data, held_out, _ = english_corpus(device, args.docstring_bytes)
    initial = byte_gpt2(args, device)
    report = Report("bench_convert_recall", "Key-value recall after conversion (benchmarks/bench_convert_recall.py)",
                    args)
    report.line(f"{provenance(torch.cuda.get_device_name() if device == 'cuda' else platform.machine())}; GPT-2 shape "
                f"{args.layers} layers x {args.width}, {args.heads} heads of {head_dim}, byte-level; recall rows only "
                f"({args.length} bytes, English filler from {len(train_data) / 1e6:.2f} MB of text), dense training "
                f"{args.steps} steps of {args.batch}, fine-tune {finetune_steps} steps; recall accuracy (chance 10%) "
                f"at filler distances {args.distances} bytes")
    report.line()
    distances = " | ".join(f"recall @{d}" for d in args.distances)
    report.line(f"| topk | model | {distances} | seconds |")
    report.line("|---|---|" + "---|" * len(args.distances) + "---|")

    def measure(topk, name, model, seconds):
        accuracy = [recall_accuracy(model, held_out, args.length, d) for d in args.distances]
        report.row(dict(topk=topk, model=name, **{f"recall_{d}": a for d, a in zip(args.distances, accuracy)},
                        seconds=round(seconds, 1)),
                   f"| {topk or '-'} | {name} | " + " | ".join(f"{a:.0%}" for a in accuracy) + f" | {seconds:.0f} |")

    start = time.time()
    dense = copy.deepcopy(initial)
    train(dense, train_data, args.steps, args.batch, args.length, args.lr, seed=1, make_batch=recall_batch)
    measure(None, "dense", dense, time.time() - start)
    calibration = examples(train_data, 8, 16, args.length, 2, recall_batch)
    tuning = examples(train_data, max(finetune_steps, 1), args.batch, args.length, 3, recall_batch)
    for topk in topks:
        for name, model, seconds in conversion_variants(dense, initial, topk, calibration, tuning, finetune_steps,
                                                        train_data, args, recall_batch):
            measure(topk, name, model, seconds)
    report.finish(plot=plot_recall)


if __name__ == "__main__":
    main()
