"""Compile time of torch.compile(backend="sfa") vs backend="inductor" on a GPT-2-small-shaped model.

Random weights from a config (no downloads). Each backend compiles a fresh copy after torch._dynamo.reset()
with Inductor's caches disabled, so both pay the full cost. Prints a table and the sfa/inductor ratio.

    python benchmarks/bench_compile_time.py [--layers 12] [--length 128] [--device cpu|cuda]
                                                [--out DIR] [--publish]
"""

import argparse
import copy
import os
import platform
import time

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402
import transformers  # noqa: E402
from publish import Report, add_arguments, provenance  # noqa: E402


def compile_seconds(model, ids, backend, options=None):
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend=backend, options=options)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        compiled(ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return first, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_arguments(parser)
    args = parser.parse_args()
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(cfg).eval().to(args.device)
    ids = torch.randint(0, cfg.vocab_size, (1, args.length), device=args.device)
    torch.compile(lambda x: x + 1)(torch.ones(1, device=args.device))  # one-time Inductor start-up, outside both
    rows = [("inductor", *compile_seconds(model, ids, "inductor")),
            ("sfa (topk 16)", *compile_seconds(model, ids, "sfa", {"topk": 16}))]
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    report = Report("bench_compile_time",
                    'Compile time: backend="sfa" vs "inductor" (benchmarks/bench_compile_time.py)', args)
    report.line(f"{provenance(device)}; GPT-2 small shape ({args.layers} layers, d_model 768, 12 heads), random "
                f"weights, batch 1, length {args.length}, no grad, Inductor caches off. First call includes the "
                "compile; second call is one steady-state forward (indicative)")
    report.line()
    report.line("| backend | first call s | second call s | first call vs inductor |")
    report.line("|---|---|---|---|")
    for name, first, second in rows:
        report.row(dict(backend=name, first_s=round(first, 3), second_s=round(second, 5)),
                   f"| {name} | {first:.2f} | {second:.4f} | {first / rows[0][1]:.2f}x |")
    report.finish()

if __name__ == "__main__":
    main()
