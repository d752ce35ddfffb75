"""FlashSFA prefill (top-k included, on the engine the op picks) vs SDPA's flash and cuDNN backends, on one GPU.

For each head dim, topk and length: first checks FlashSFA against the reference on the same inputs
(must pass), then times forward and forward+backward with CUDA events (triton.testing.do_bench, median),
and records the engine the op ran (kernels/prefill.py) and the peak memory of one forward+backward. Where the op
picked one of SDPA's backends, the same call is also timed on our Triton kernels (SDPA's backends switched off
with ``sdpa_kernel``, which the engine rules honour): the measurements behind the rule table. ``--key-heads``
below ``--heads`` times grouped-query attention (enable_gqa for SFA and for SDPA).
TFLOP/s are dense-equivalent: causal forward 4*B*H*N^2*d/2 FLOPs, backward 2.5x that (FlashAttention's
convention), so SFA and dense rows compare by time.

    python benchmarks/bench_prefill.py [--dims 64 128] [--topks 8 16] [--lengths 4096 16384 65536]
                                       [--tokens 65536] [--heads 16] [--key-heads 8]
    python benchmarks/bench_prefill.py --cpu [--threads 2]   # SDPA vs flash_sfa on the CPU, same table
    ... [--out DIR] [--publish]   # also write the table, a CSV and a plot (benchmarks/publish.py)

Batch = tokens // length, so every length fills the GPU with the same number of query tokens.
"""

import argparse
import multiprocessing
import os
import platform
import statistics
import time
import warnings
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from publish import Report, add_arguments, log_log_axes, provenance
from torch.nn.attention import SDPBackend, sdpa_kernel

from sfa_compile import flash_sfa
from sfa_compile.kernels import prefill, reference
from sfa_compile.kernels.triton_topk import sparsify_triton

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def check(head_dim, topk, dtype):
    """FlashSFA vs the pure-PyTorch reference (fp32 compute) at a moderate size; raises on mismatch."""
    g = torch.Generator(device="cuda").manual_seed(head_dim + topk)
    q, k, v = (torch.randn(2, 4, 1031, head_dim, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    out = flash_sfa(q, k, v, topk=topk, is_causal=True)
    want, _ = reference.flash_sfa_reference(q, k, v, topk, is_causal=True)
    err = (out.float() - want.float()).abs().max().item()
    if not err < 2e-2:
        raise SystemExit(f"FlashSFA disagrees with the reference: max error {err} (d={head_dim}, topk={topk})")


def time_case(batch, heads, key_heads, length, head_dim, topk, dtype):
    g = torch.Generator(device="cuda").manual_seed(length)
    q, k, v = (torch.randn(batch, n, length, head_dim, device="cuda", dtype=dtype, generator=g)
               for n in (heads, key_heads, key_heads))
    gqa = key_heads != heads
    d_out = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    res = {}

    def fwd_bwd(attend):
        def run():
            out = attend(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), d_out)
        return run

    sfa = lambda q, k, v: flash_sfa(q, k, v, topk=topk, is_causal=True, enable_gqa=gqa)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the reference would make the numbers meaningless
        res["sfa_fwd"] = bench(lambda: sfa(q, k, v))
        res["sfa_fwdbwd"] = bench(fwd_bwd(sfa))
        res["engine"] = prefill.engine_for(q, k, v, is_causal=True, enable_gqa=gqa)
        res["triton_fwd"], res["triton_fwdbwd"] = res["sfa_fwd"], res["sfa_fwdbwd"]
        if res["engine"] != prefill.TRITON:
            with sdpa_kernel(SDPBackend.MATH):  # no SDPA backend the op may pick: our Triton kernels run
                assert prefill.engine_for(q, k, v, is_causal=True, enable_gqa=gqa) == prefill.TRITON
                res["triton_fwd"] = bench(lambda: sfa(q, k, v))
                res["triton_fwdbwd"] = bench(fwd_bwd(sfa))
    res["topk_only"] = bench(lambda: (sparsify_triton(q, topk), sparsify_triton(k, topk)))
    res["sfa_peak_mib"] = peak_mib(fwd_bwd(sfa))
    with sdpa_kernel(BACKENDS["cudnn"]):
        res["cudnn_peak_mib"] = peak_mib(fwd_bwd(dense := lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=gqa)))
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                res[f"{name}_fwd"] = bench(lambda: dense(q, k, v))
                res[f"{name}_fwdbwd"] = bench(fwd_bwd(dense))
        except RuntimeError as err:  # backend unavailable for this shape
            print(f"  {name}: {str(err).splitlines()[0]}")
            res[f"{name}_fwd"] = res[f"{name}_fwdbwd"] = float("nan")
    return res


def peak_mib(run) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_times(fns, min_reps: int = 15, min_seconds: float = 2.0) -> list:
    """Median ms of each function, run in turn within every repetition (a slow spell of the machine hits all of
    them alike), and the median of each one's per-repetition ratio to the first. Repetitions continue until the
    first function has run ``min_seconds`` (short cases get hundreds: single slow spells then move no median)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    while len(times[0]) < min_reps or sum(times[0]) < min_seconds * 1e3:
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    ratios = [statistics.median(t / base for t, base in zip(ts, times[0])) for ts in times]
    return [statistics.median(ts) for ts in times], ratios


def cpu_case(head_dim: int, topk: int, length: int, heads: int) -> dict:
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
    d_out = torch.randn_like(q)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    sfa = lambda q, k, v: flash_sfa(q, k, v, topk=topk, is_causal=True)  # noqa: E731
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    r = dict(d=head_dim, topk=topk, N=length, engine=prefill.engine_for(q, k, v, is_causal=True))
    attends = (dense, sfa)
    (r["sdpa_fwd"], r["sfa_fwd"]), (_, r["fwd_ratio"]) = cpu_times(
        [lambda attend=attend: attend(q, k, v) for attend in attends])
    (r["sdpa_fwdbwd"], r["sfa_fwdbwd"]), (_, r["fwdbwd_ratio"]) = cpu_times(
        [lambda attend=attend: torch.autograd.grad(attend(*inputs), inputs, d_out) for attend in attends])
    return r


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _peak_above_inputs(engine: str, head_dim: int, topk: int, length: int, heads: int, threads: int) -> float:
    """MiB of resident memory one forward+backward adds above its inputs at its peak (Linux: the process's
    high-water mark, reset after a warm-up run). Run in a fresh process per engine (``cpu_peak_mib``)."""
    torch.set_num_threads(threads)
    if engine == "sfa":
        attend = lambda q, k, v: flash_sfa(q, k, v, topk=topk, is_causal=True)  # noqa: E731
    else:
        attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    inputs = [torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3)]
    d_out = torch.randn(1, heads, length, head_dim)
    torch.autograd.grad(attend(*inputs), inputs, d_out)
    base = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size
    torch.autograd.grad(attend(*inputs), inputs, d_out)
    return (_resident_kib("VmHWM") - base) / 1024


# glibc keeps some freed buffers resident below its adaptive mmap threshold (the peak then varies run to run); with a
# fixed 64 KiB threshold every tensor-sized buffer leaves the resident set when freed.
_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def cpu_peak_mib(head_dim: int, topk: int, length: int, heads: int, threads: int) -> Optional[tuple]:
    """(SDPA, flash_sfa) peak MiB above the inputs of one forward+backward, each in a fresh process with glibc's
    mmap threshold fixed at 64 KiB; None where /proc does not give a resettable high-water mark (not Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    context = multiprocessing.get_context("spawn")
    # Read by each worker's glibc at start; the environment is restored afterwards.
    with mock.patch.dict(os.environ, {_MMAP_THRESHOLD: "65536"}), context.Pool(1, maxtasksperchild=1) as pool:
        return tuple(pool.apply(_peak_above_inputs, (engine, head_dim, topk, length, heads, threads))
                     for engine in ("sdpa", "sfa"))  # a new worker process for each engine


def cpu_main(args) -> None:
    """SDPA vs flash_sfa on the CPU (float32, causal), forward and forward+backward, same shapes and threads."""
    torch.set_num_threads(args.threads)
    report = Report("bench_prefill_cpu", "Prefill on the CPU: flash_sfa vs SDPA (benchmarks/bench_prefill.py --cpu)",
                    args)
    report.line(f"{provenance(f'CPU ({platform.machine()}, {os.cpu_count()} cores)')}; {args.threads} threads, "
                f"float32, causal, {args.cpu_heads} heads, batch 1; ratios are medians of per-repetition ratios")
    report.line()
    report.line("| d | topk | N | engine | SDPA fwd ms | SFA fwd ms | SFA / SDPA | SDPA f+b ms | SFA f+b ms "
                "| SFA / SDPA |")
    report.line("|---|---|---|---|---|---|---|---|---|---|")
    for head_dim in args.cpu_dims:
        for topk in args.topks:
            for length in args.cpu_lengths:
                r = cpu_case(head_dim, topk, length, args.cpu_heads)
                report.row(r, f"| {head_dim} | {topk} | {length} | {r['engine']} | {r['sdpa_fwd']:.2f} "
                              f"| {r['sfa_fwd']:.2f} | {r['fwd_ratio']:.2f}x | {r['sdpa_fwdbwd']:.2f} "
                              f"| {r['sfa_fwdbwd']:.2f} | {r['fwdbwd_ratio']:.2f}x |")
    peaks = cpu_peak_mib(args.cpu_dims[0], args.topks[0], args.memory_length, args.cpu_heads, args.threads)
    if peaks is not None:
        tensor_mib = args.cpu_heads * args.memory_length * args.cpu_dims[0] * 4 / 2**20
        report.line()
        report.line(f"Peak memory above the inputs, one forward+backward at N = {args.memory_length} (d "
                    f"{args.cpu_dims[0]}, topk {args.topks[0]}; each engine in a fresh process, glibc's "
                    f"MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set; one q is "
                    f"{tensor_mib:.0f} MiB): SDPA {peaks[0]:.0f} MiB, flash_sfa {peaks[1]:.0f} MiB (SDPA's plus the "
                    f"two sparsified copies: {peaks[0] + 2 * tensor_mib:.0f} MiB).")
    report.finish(plot=lambda figure, rows: plot_times(figure, rows, {"SDPA": "sdpa", "flash_sfa": "sfa"}))


def plot_times(figure, rows, engines: dict) -> None:
    """Time against N, one panel per head dim: each engine's forward (solid) and forward+backward (dashed); the
    dense engines' times come from the first topk's rows (they do not depend on it)."""
    dims = sorted({r["d"] for r in rows})
    for i, d in enumerate(dims):
        axes = figure.add_subplot(1, len(dims), i + 1)
        group = [r for r in rows if r["d"] == d]
        lines = {}
        for label, key in engines.items():
            topks = sorted({r["topk"] for r in group}) if key == "sfa" else [min(r["topk"] for r in group)]
            for topk in topks:
                name = f"{label} topk {topk}" if key == "sfa" else label
                for phase, suffix, style in (("fwd", "_fwd", "-"), ("f+b", "_fwdbwd", "--")):
                    points = sorted((r["N"], r[key + suffix]) for r in group if r["topk"] == topk)
                    lines[f"{name} {phase}"] = (points, style)
        for j, (label, (points, style)) in enumerate(lines.items()):
            axes.plot(*zip(*points), style, marker="o", color=f"C{j // 2}", label=label)
        log_log_axes(axes, f"head dim {d} (lower is better)", "N (tokens)", "ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--topks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--key-heads", type=int, default=None, help="key/value heads (default: --heads; fewer: GQA)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    add_arguments(parser)
    parser.add_argument("--cpu", action="store_true", help="time SDPA vs flash_sfa on the CPU instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--cpu-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--cpu-heads", type=int, default=8)
    parser.add_argument("--memory-length", type=int, default=16384, help="N of the CPU peak-memory measurement")
    args = parser.parse_args()
    if args.cpu:
        return cpu_main(args)
    key_heads = args.heads if args.key_heads is None else args.key_heads
    if key_heads < 1 or args.heads % key_heads:
        parser.error(f"--key-heads must be a positive divisor of --heads {args.heads}, got {key_heads}")
    dtype = getattr(torch, args.dtype)
    report = Report("bench_prefill", "Prefill: FlashSFA vs SDPA flash and cuDNN (benchmarks/bench_prefill.py)", args)
    report.line(f"{provenance(torch.cuda.get_device_name())}; {args.dtype}, causal, {args.heads} query heads, "
                f"{key_heads} key heads, batch = "
                f"{args.tokens} / N; top-k of q and k included; ratios > 1: FlashSFA faster; peak memory: one "
                "forward+backward above the inputs")
    report.line()
    header = ("| d | topk | N | batch | SFA fwd ms | flash fwd ms | cuDNN fwd ms | SFA fwd TFLOP/s | flash | cuDNN "
              "| fwd vs flash | fwd vs cuDNN | SFA f+b ms | flash f+b ms | cuDNN f+b ms | f+b vs flash "
              "| f+b vs cuDNN | top-k ms | engine | SFA on Triton fwd / f+b ms | SFA f+b MiB | cuDNN f+b MiB |")
    report.line(header)
    report.line("|" + "---|" * (header.count("|") - 1))
    for head_dim in args.dims:
        for topk in args.topks:
            check(head_dim, topk, dtype)
            for length in args.lengths:
                batch = max(1, args.tokens // length)
                r = time_case(batch, args.heads, key_heads, length, head_dim, topk, dtype)
                flops = 4 * batch * args.heads * length * length * head_dim / 2
                tf = lambda ms, flops=flops: flops / ms / 1e9  # noqa: E731
                report.row(dict(d=head_dim, topk=topk, N=length, batch=batch, **r),
                           f"| {head_dim} | {topk} | {length} | {batch} | {r['sfa_fwd']:.3f} | {r['flash_fwd']:.3f} "
                           f"| {r['cudnn_fwd']:.3f} | {tf(r['sfa_fwd']):.0f} | {tf(r['flash_fwd']):.0f} "
                           f"| {tf(r['cudnn_fwd']):.0f} | {r['flash_fwd'] / r['sfa_fwd']:.2f}x "
                           f"| {r['cudnn_fwd'] / r['sfa_fwd']:.2f}x | {r['sfa_fwdbwd']:.3f} | {r['flash_fwdbwd']:.3f} "
                           f"| {r['cudnn_fwdbwd']:.3f} | {r['flash_fwdbwd'] / r['sfa_fwdbwd']:.2f}x "
                           f"| {r['cudnn_fwdbwd'] / r['sfa_fwdbwd']:.2f}x | {r['topk_only']:.3f} | {r['engine']} "
                           f"| {r['triton_fwd']:.3f} / {r['triton_fwdbwd']:.3f} "
                           f"| {r['sfa_peak_mib']:.0f} | {r['cudnn_peak_mib']:.0f} |")
    report.finish(plot=lambda figure, rows: plot_times(figure, rows, {"FlashSFA": "sfa", "flash": "flash",
                                                                      "cuDNN": "cudnn"}))

if __name__ == "__main__":
    main()
