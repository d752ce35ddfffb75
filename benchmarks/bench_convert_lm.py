"""Converting a pretrained causal LM to SFA: plain top-k, calibrated, calibrated + a short fine-tune, vs from scratch.

A GPT-2-shaped byte-level model (vocabulary 256: no tokenizer download) is pretrained densely on the largest
English text this machine has offline: CPython's ``pydoc_data.topics``, the docstrings of the standard library's
modules, classes and functions, and the project's built-in sentences (sizes printed in the table's header; the
last 5% of each source is held out).
Then, per topk (d/4 and d/8 by default), on copies of the same pretrained model:
  plain       ``convert(model, SFAConfig(topk))``: R = identity, the paper's method without training;
  calibrated  ``convert(model, SFAConfig(topk), calibration=batches)``: the conversion defaults (principal axes and
              the layer-local Eq. 8 refinement), R kept as a run-time projection so the fine-tune can train it;
  + fine-tune the calibrated model trained on the LM loss + Eq. 8 at finetune's default weight beside a task loss
              (``sfa_compile.finetune``, model weights and R, straight-through top-k) for ``--finetune-steps``
              (default 10% of the pretraining steps);
  scratch     an SFA model of the same initialization trained for pretraining + fine-tuning steps.
Reported: held-out perplexity per byte, its ratio to dense, and the share of plain top-k's gap to dense that the
variant recovers. Whether a converted model keeps a learned retrieval: bench_convert_recall.py.

    python benchmarks/bench_convert_lm.py [--steps 2000] [--finetune-steps 200] [--topks 16 8]
                                          [--layers 6] [--width 384] [--heads 6] [--out DIR] [--publish]
"""

import argparse
import ast
import copy
import math
import platform
import sysconfig
import time
from importlib import resources
from pathlib import Path
from pydoc_data.topics import topics
from typing import Optional

import torch
from bench_lm_perplexity import add_model_arguments, batch, byte_gpt2, held_out_loss, train
from publish import Report, add_arguments, provenance

import sfa_compile
from sfa_compile.training.finetune import finetune


def stdlib_docstrings(limit_bytes: Optional[int] = None) -> str:
    """Module, class and function docstrings of the standard library's own .py files (tests excluded)."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "idlelib" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    texts.append(doc)
                    size += len(doc)
        if limit_bytes is not None and size >= limit_bytes:
            break
    return "\n\n".join(texts)


def english_corpus(device, docstring_bytes: Optional[int]):
    """(train bytes, held-out bytes, source sizes): the last 5% of each source is held out."""
    sources = {
        "pydoc_data.topics": "\n\n".join(topics[k] for k in sorted(topics)),
        "stdlib docstrings": stdlib_docstrings(docstring_bytes),
        "built-in sentences": resources.files("sfa_compile").joinpath("data/sentences.txt").read_text(),
    }
    train, held_out = [], []
    for text in sources.values():
        data = text.encode("utf-8", errors="ignore")
        split = int(0.95 * len(data))
        train.append(data[:split])
        held_out.append(data[split:])
    as_tensor = lambda parts: torch.tensor(list(b"\n\n".join(parts)), dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(train), as_tensor(held_out), {k: len(v.encode()) for k, v in sources.items()}


def examples(data, count, size, length, seed, make_batch=batch):
    """``count`` batches of ``make_batch`` as ``convert`` / ``finetune`` examples (input_ids and labels: output.loss
    is the LM loss)."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        x, _ = make_batch(data, size, length, generator)
        made.append({"input_ids": x, "labels": x})
    return made


def add_conversion_arguments(parser, steps: int) -> None:
    """The dense model's shape and training, and what ``conversion_variants`` runs."""
    parser.add_argument("--steps", type=int, default=steps, help="dense training steps")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: 10%% of --steps")
    parser.add_argument("--topks", type=int, nargs="+", default=None, help="default: d/4 and d/8")
    add_model_arguments(parser)
    parser.add_argument("--model-lr", type=float, default=3e-4, help="fine-tuning learning rate of the weights")


def conversion_settings(args) -> tuple:
    """(head dim, topks, fine-tune steps) with ``add_conversion_arguments``'s defaults filled in."""
    head_dim = args.width // args.heads
    topks = args.topks or [head_dim // 4, head_dim // 8]
    return head_dim, topks, args.finetune_steps if args.finetune_steps is not None else args.steps // 10


def conversion_variants(dense, initial, topk, calibration, tuning, finetune_steps, train_data, args, make_batch,
                        lam=None):
    """(name, model, seconds) of each variant at ``topk`` in table order (module docstring), each timed without
    what the caller does with the one before: plain top-k, calibrated, calibrated + fine-tune (when
    ``finetune_steps``), SFA from scratch trained on ``make_batch`` from ``initial``."""
    device = next(dense.parameters()).device.type
    sfa_config = sfa_compile.SFAConfig(topk=topk)
    start = time.time()
    plain = sfa_compile.convert(copy.deepcopy(dense), sfa_config, progress=False)
    yield "plain top-k", plain, time.time() - start
    del plain
    start = time.time()
    calibrated = sfa_compile.convert(copy.deepcopy(dense), sfa_config, calibration, fold=False, progress=False)
    yield "calibrated (defaults)", calibrated, time.time() - start
    if finetune_steps:
        start = time.time()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            finetune(calibrated, tuning, finetune_steps, task_loss=lambda out, example: out.loss, train_model=True,
                     model_lr=args.model_lr, lr=1e-2, lam=lam, straight_through=True, final_lr_factor=0.25,
                     progress=False)
        yield "calibrated + fine-tune", calibrated, time.time() - start
    del calibrated
    start = time.time()
    scratch = sfa_compile.convert(copy.deepcopy(initial), sfa_config, progress=False)
    train(scratch, train_data, args.steps + finetune_steps, args.batch, args.length, args.lr, seed=1,
          make_batch=make_batch)
    yield "SFA from scratch", scratch, time.time() - start


def plot_conversion(figure, rows) -> None:
    """Held-out perplexity of each variant per topk, the dense model's as a dashed line (log scale: plain top-k is
    several times dense)."""
    axes = figure.add_subplot(1, 1, 1)
    dense = next(r["ppl"] for r in rows if not r["topk"])
    variants = list(dict.fromkeys(r["model"] for r in rows if r["topk"]))
    for topk in dict.fromkeys(r["topk"] for r in rows if r["topk"]):
        ppl = {r["model"]: r["ppl"] for r in rows if r["topk"] == topk}
        axes.plot(variants, [ppl.get(v) for v in variants], marker="o", label=f"SFA topk {topk}")
    axes.axhline(dense, linestyle="--", color="gray", label="dense")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter("{x:g}")  # plain numbers, not powers of ten, on the few decades shown
    axes.yaxis.set_minor_formatter("{x:g}")
    axes.set_ylabel("held-out perplexity per byte")
    axes.set_title("Converting a pretrained causal LM: perplexity by method", fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(True, which="both", alpha=0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_conversion_arguments(parser, steps=2000)
    parser.add_argument("--lam", type=float, default=None, help="Eq. 8 weight (default: finetune's beside a task loss)")
    parser.add_argument("--docstring-bytes", type=int, default=None, help="cap on the docstring text (default: all)")
    add_arguments(parser)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head_dim, topks, finetune_steps = conversion_settings(args)
    train_data, held_out, sizes = english_corpus(device, args.docstring_bytes)
    initial = byte_gpt2(args, device)
    report = Report("bench_convert_lm", "Converting a pretrained causal LM (benchmarks/bench_convert_lm.py)", args)
    report.line(f"{provenance(torch.cuda.get_device_name() if device == 'cuda' else platform.machine())}; GPT-2 shape "
                f"{args.layers} layers x {args.width}, {args.heads} heads of {head_dim}, byte-level; corpus "
                + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
                + f" ({len(train_data) / 1e6:.2f} MB train, {len(held_out) / 1e6:.2f} MB held out); pretraining "
                f"{args.steps} steps of {args.batch} x {args.length}, fine-tune {finetune_steps} steps")
    report.line()
    report.line("| topk | model | held-out ppl/byte | vs dense | plain gap recovered | seconds |")
    report.line("|---|---|---|---|---|---|")

    def measure(topk, name, model, seconds, plain_ppl=None, dense_ppl=None):
        ppl = math.exp(held_out_loss(model, held_out, args.length))
        recovered = ((plain_ppl - ppl) / (plain_ppl - dense_ppl) if plain_ppl and plain_ppl != dense_ppl else None)
        vs = f"{ppl / dense_ppl - 1:+.1%}" if dense_ppl else "-"
        report.row(dict(topk=topk, model=name, ppl=ppl, vs_dense=ppl / dense_ppl - 1 if dense_ppl else 0.0,
                        recovered=recovered, seconds=round(seconds, 1)),
                   f"| {topk or '-'} | {name} | {ppl:.3f} | {vs} | "
                   f"{'-' if recovered is None else f'{recovered:.0%}'} | {seconds:.0f} |")
        return ppl

    start = time.time()
    dense = copy.deepcopy(initial)
    train(dense, train_data, args.steps, args.batch, args.length, args.lr, seed=1, make_batch=batch)
    dense_ppl = measure(None, "dense (pretrained)", dense, time.time() - start)
    calibration = examples(train_data, 8, 16, args.length, 2)
    tuning = examples(train_data, max(finetune_steps, 1), args.batch, args.length, 3)
    for topk in topks:
        plain_ppl = None
        for name, model, seconds in conversion_variants(dense, initial, topk, calibration, tuning, finetune_steps,
                                                        train_data, args, batch, lam=args.lam):
            ppl = measure(topk, name, model, seconds, plain_ppl, dense_ppl)
            plain_ppl = plain_ppl or ppl
    report.finish(plot=plot_conversion)


if __name__ == "__main__":
    main()
