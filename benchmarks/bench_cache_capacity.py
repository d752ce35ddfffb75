"""How many tokens of KV cache fit on one GPU next to a Qwen3-0.6B-shaped model: dense bf16 (StaticCache) vs SFA
with bf16 values vs SFA with FP8 values (static SFACache), one run.

Per cache kind: the bytes one cached token takes in all layers (allocated by a 1024-token static cache, measured with
torch.cuda.memory_allocated), the capacity the free memory holds after a 2 GiB headroom, then that capacity
allocated for real (batch 1) with a 16-token prompt and one decode step run through it; on an out-of-memory error
the capacity shrinks by 5% and it tries again. Reported: the longest context at batch 1, and the largest batch of
32k-token sequences the same bytes hold (bytes scale with batch x tokens); the plot: cache GiB vs context per kind.

    python benchmarks/bench_cache_capacity.py [--topk 8] [--out DIR] [--publish]
"""

import argparse

import torch
from bench_generate import cache_kwarg, qwen3_06b
from publish import Report, add_arguments, log_log_axes, provenance
from transformers import StaticCache

import sfa_compile
from sfa_compile import SFACache

HEADROOM = 2 << 30  # activations and logits of a decode step, the allocator's slack
SEQUENCE = 32768


@torch.no_grad()
def fill_and_step(model, cache, prompt_length=16):
    """A prompt into ``cache`` and one decode step after it: the cache is allocated and used."""
    prompt = torch.randint(0, 1000, (1, prompt_length), device="cuda")
    out = model(input_ids=prompt, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1,
                cache_position=torch.arange(prompt_length, device="cuda"))
    position = torch.tensor([prompt_length], device="cuda")
    model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwarg(model, cache), use_cache=True,
          cache_position=position, position_ids=position[None])
    torch.cuda.synchronize()


def bytes_per_token(model, make_cache, tokens=1024) -> float:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    cache = make_cache(tokens)
    fill_and_step(model, cache)
    used = torch.cuda.memory_allocated() - before
    del cache
    return used / tokens


def fits(model, make_cache, capacity: int) -> bool:
    """Whether a cache of ``capacity`` tokens allocates and runs (freed again before returning)."""
    try:
        fill_and_step(model, make_cache(capacity))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_capacity(model, make_cache, per_token: float) -> int:
    torch.cuda.empty_cache()
    capacity = int((torch.cuda.mem_get_info()[0] - HEADROOM) / per_token)
    for _ in range(8):
        if fits(model, make_cache, capacity):
            return capacity
        capacity = int(capacity * 0.95)
    raise SystemExit("no capacity fits after 8 tries")


def plot_capacity(figure, rows) -> None:
    """Cache GiB vs context length (batch 1) per cache kind, each line ending at the capacity it reached."""
    axes = figure.add_subplot(1, 1, 1)
    for row in rows:
        contexts = [2 ** p for p in range(10, 24) if 2 ** p < row["capacity"]] + [row["capacity"]]
        axes.plot(contexts, [row["bytes_per_token"] * n / 2**30 for n in contexts], marker=".", label=row["cache"])
    log_log_axes(axes, "KV cache bytes vs context, batch 1 (each line ends where the GPU is full)", "context (tokens)",
                 "cache GiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=int, default=8)
    add_arguments(parser)
    args = parser.parse_args()
    model = qwen3_06b(151936)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report = Report("bench_cache_capacity", "KV cache that fits on one GPU (benchmarks/bench_cache_capacity.py)", args)
    report.line(f"{provenance(torch.cuda.get_device_name())}; Qwen3-0.6B shape (28 layers, 8 key heads of 128, bf16 "
                f"weights {weights / 2**30:.2f} GiB, random), {HEADROOM >> 30} GiB headroom; each capacity allocated "
                "and run (16-token prompt, one decode step)")
    report.line()
    report.line("| cache | bytes per token (all layers) | vs dense | longest context, batch 1 | "
                f"largest batch at {SEQUENCE // 1024}k |")
    report.line("|---|---|---|---|---|")
    kinds = [("dense bf16 (StaticCache)", lambda n: StaticCache(model.config, max_cache_len=n)),
             (f"SFA topk {args.topk}, bf16 values", lambda n: SFACache(model, max_cache_len=n)),
             (f"SFA topk {args.topk}, FP8 values",
              lambda n: SFACache(model, max_cache_len=n, value_dtype=torch.float8_e4m3fn))]
    dense_per_token = None
    for name, make_cache in kinds:
        if name.startswith("SFA") and not getattr(model.config, "sfa", None):
            sfa_compile.convert(model, sfa_compile.SFAConfig(topk=args.topk), progress=False)  # in place
        per_token = bytes_per_token(model, make_cache)
        dense_per_token = dense_per_token or per_token
        capacity = largest_capacity(model, make_cache, per_token)
        report.row(dict(cache=name, bytes_per_token=round(per_token), capacity=capacity,
                        batch_at_32k=capacity // SEQUENCE),
                   f"| {name} | {per_token:,.0f} | {per_token / dense_per_token:.3f} | {capacity:,} "
                   f"| {capacity // SEQUENCE} |")
    report.finish(plot=plot_capacity)


if __name__ == "__main__":
    main()
