"""ONNX Runtime on the CPU: FlashSFA plugin vs the FlashSFA function body (no plugin) vs the dense model's ONNX.

Two workloads, each at sequence lengths 512 and 2048, batch 1, float32, causal:
  attention: one attention call, 8 query / 8 key heads of dim 64 (the op alone);
  model:     a Llama-shaped random-weight model (4 layers, hidden 512, 8 query / 2 key heads of dim 64, RoPE,
             learned projections R), dense vs converted with topk = 8 and 16 (the whole forward).
Correctness first: for attention alone the plugin and the function body must agree with torch (<= 1e-4
relative). For the whole model the deviations are reported (err_vs_torch, err_vs_plugin), not enforced: at
long lengths they can pass 1e-4 because a 1-ulp difference upstream (ONNX Runtime's and torch's matmuls
round differently) flips which feature a query or key keeps when its k-th and (k+1)-th magnitudes nearly
tie, and the flip carries into the next layers.
Times are medians over repeated runs with ONNX Runtime's default intra-op threads (all cores).

    python benchmarks/bench_onnx_cpu.py [--lengths 512 2048] [--topks 8 16] [--repeats 10] [--out DIR] [--publish]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  (its version goes into the provenance line)
import torch
import transformers
from publish import Report, add_arguments, log_log_lines, provenance

import sfa_compile


class Attention(torch.nn.Module):
    def __init__(self, topk=None):
        super().__init__()
        self.topk = topk

    def forward(self, q, k, v):
        if self.topk is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sfa_compile.flash_sfa(q, k, v, topk=self.topk, is_causal=True)


def llama(topk):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=64, intermediate_size=1024, vocab_size=1000,
                                      attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    if topk is not None:
        calibration = [{"input_ids": torch.randint(0, 1000, (1, 256))}]
        sfa_compile.convert(model, sfa_compile.SFAConfig(topk=topk), calibration, progress=False)
    return model


def export(model, args, kwargs, path, sfa: bool):
    """Every input dim dynamic except the head dim of q/k/v."""
    auto = torch.export.Dim.AUTO
    names = list(kwargs) if kwargs else ["q", "k", "v"]
    values = list(kwargs.values()) if kwargs else list(args)
    shapes = {n: {i: auto for i in range(v.dim() - (v.dim() == 4))} for n, v in zip(names, values)}
    with torch.no_grad():
        if sfa:
            sfa_compile.export_onnx(model, args, path, kwargs=kwargs, dynamic_shapes=shapes)
        else:
            torch.onnx.export(model, tuple(args), path, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                              verbose=False)


def median_ms(sess, feeds, repeats):
    sess.run(None, feeds)  # warm-up (allocations, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(out, expected) -> float:
    return float(np.abs(out - expected).max() / np.abs(expected).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--topks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=10)
    add_arguments(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    workloads = {
        "attention": (lambda topk: Attention(topk),
                      lambda n: ((torch.randn(1, 8, n, 64), torch.randn(1, 8, n, 64), torch.randn(1, 8, n, 64)), {})),
        "model": (llama, lambda n: ((), {"input_ids": torch.randint(0, 1000, (1, n))})),
    }
    for workload, (make, example) in workloads.items():
        for topk in [None, *args.topks]:
            model = make(topk)
            path = str(tmp / f"{workload}_{topk}.onnx")
            export(model, *example(64), path, sfa=topk is not None)
            variants = [("dense", False)] if topk is None else [("plugin", True), ("function", False)]
            for length in args.lengths:
                inputs, kwargs = example(length)
                with torch.no_grad():
                    expected = model(*inputs, **kwargs)
                    expected = (expected if isinstance(expected, torch.Tensor) else expected.logits).numpy()
                names = list(kwargs) or ["q", "k", "v"]
                feeds = dict(zip(names, (t.numpy() for t in (list(kwargs.values()) or inputs))))
                first = None
                for variant, plugin in variants:
                    sess = sfa_compile.ort_session(path, plugin=plugin)
                    out = sess.run(None, feeds)[0]
                    first = out if first is None else first
                    if workload == "attention" and relative_error(out, expected) > 1e-4:
                        raise SystemExit(f"attention topk {topk} {length}: {variant} differs from torch by "
                                         f"{relative_error(out, expected):.2e}")
                    ms = median_ms(sess, feeds, args.repeats)
                    rows.append({"workload": workload, "length": length, "topk": topk or "dense",
                                 "variant": variant, "ms": round(ms, 2),
                                 "err_vs_torch": f"{relative_error(out, expected):.1e}",
                                 "err_vs_plugin": f"{relative_error(out, first):.1e}"})
                    print(rows[-1], flush=True)  # progress; the table follows at the end
    dense = {(r["workload"], r["length"]): r["ms"] for r in rows if r["variant"] == "dense"}
    report = Report("bench_onnx_cpu", "ONNX Runtime on the CPU: FlashSFA plugin vs function body vs dense ONNX "
                    "(benchmarks/bench_onnx_cpu.py)", args)
    report.line(f"{provenance(f'CPU ({platform.machine()}, {os.cpu_count()} cores)')}; batch 1, float32, causal; "
                "ONNX Runtime's default intra-op threads")
    report.line()
    report.line("| workload | length | topk | variant | ms | speed vs dense ONNX | err vs torch | err vs plugin |")
    report.line("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = round(dense[(r["workload"], r["length"])] / r["ms"], 3)
        report.row(r, f"| {r['workload']} | {r['length']} | {r['topk']} | {r['variant']} | {r['ms']:.2f} "
                      f"| {r['speedup']:.2f}x | {r['err_vs_torch']} | {r['err_vs_plugin']} |")
    report.finish(plot=plot_onnx)


def plot_onnx(figure, rows) -> None:
    """Time against length per workload, one line per (topk, variant)."""
    for i, workload in enumerate(("attention", "model")):
        group = [r for r in rows if r["workload"] == workload]
        lines = {}
        for r in group:
            label = "dense ONNX" if r["variant"] == "dense" else f"topk {r['topk']}, {r['variant']}"
            lines.setdefault(label, []).append((r["length"], r["ms"]))
        log_log_lines(figure.add_subplot(1, 2, i + 1), lines, f"{workload} (lower is better)", "length (tokens)",
                      "ms")

if __name__ == "__main__":
    main()
