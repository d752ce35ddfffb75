"""FlashSFA decode over the compressed key cache vs SDPA (flash, cuDNN) on the dense cache, one GPU, one run.

Attention only: one new query token per sequence (or --query-length), GQA 32 query / 8 key heads, d = 128,
bf16. Each case first checks the Triton decode against the reference op on the same cache (must pass),
then times every kernel: with CUDA events around back-to-back eager calls (triton.testing.do_bench, median;
includes host launch time where it exceeds the GPU time) and replayed from a CUDA graph (do_bench_cudagraph: GPU
time only, as in graph-captured or compiled generation). That replay reads the same cache on every call, so caches
that fit in L2 (50 MB on an H100: 1 x 8k is 34 MB dense, 20 MB SFA) stay L2-resident; a model's decode step reads
each layer's cache once, after the other layers' traffic. The "cold graph" columns model that: the captured calls
cycle through enough copies of the caches (dense and SFA alike) to span four times the L2, so each call reads its
copy from HBM. "SFA + R" is the decode with a learned projection (a converted model's layer): the query
projection and top-k run in one small kernel before the split kernel. Bandwidth counts the bytes a step must
read: compressed keys + dense V for SFA, K + V for dense. The copy ceiling is measured in the same run
(device-to-device copy, read + write bytes / time). ``--fp8-values`` caches SFA's values in FP8 (e4m3fn, a float32
scale per token and key head; ``value_dtype`` of the cache), against the same bf16 dense SDPA: its own table.

    python benchmarks/bench_decode.py [--topks 8 16] [--cases 16x32768 16x131072 1x8192 1x131072]
                                      [--fp8-values] [--sweep] [--out DIR] [--publish]

--sweep also times other split counts and key blocks per case and reports the best (tuning data).
"""

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F
import triton
from publish import Report, add_arguments, log_log_lines, provenance
from torch.nn.attention import SDPBackend, sdpa_kernel

from sfa_compile.kernels import decode_launch, ops, triton_decode
from sfa_compile.kernels.kv_cache import CompressedKVCache

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16


def bench(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


def bench_graph(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def bench_graph_cold(calls):
    """bench_graph over ``calls`` in turn: each reads its own copy of the cache."""
    cycle = itertools.cycle(calls)
    return bench_graph(lambda: next(cycle)())


def cold_copies(cache_bytes: int) -> int:
    """Copies of a cache that span four times the L2 (1 where one already does)."""
    return max(1, math.ceil(4 * torch.cuda.get_device_properties().L2_cache_size / cache_bytes))


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e9  # TB/s


def host_time(fn, calls=200) -> float:
    """Microseconds of CPU time per call (launch overhead), GPU queue not drained in between."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def dense_times(q, k, v, backend, copies) -> tuple[float, float, float]:
    """(events ms, graph ms, cold graph ms) of SDPA with one backend; NaN where it cannot run these shapes."""
    try:
        with sdpa_kernel(BACKENDS[backend]):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            events, warm = bench(call), bench_graph(call)
            if copies == 1:
                return events, warm, warm
            kvs = [(k.clone(), v.clone()) for _ in range(copies)]
            cold = bench_graph_cold([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                                     for k, v in kvs])
            return events, warm, cold
    except RuntimeError:
        return float("nan"), float("nan"), float("nan")


def check(cache, q, topk, rotation):
    kv, ki, v = cache.views()
    scales = cache.scale_view()
    for projection in (None, rotation):
        got = triton_decode.decode(q, kv, ki, v, cache.lengths, topk, HEAD_DIM ** -0.5, None, projection,
                                   value_scales=scales)
        want = ops.flash_sfa_decode_reference(q, kv, ki, v, cache.lengths, topk, projection=projection,
                                              value_scales=scales)
        err = (got.float() - want.float()).abs().max().item()
        if not err < 2e-2:
            raise SystemExit(f"decode (projection: {projection is not None}) disagrees with the reference: max "
                             f"error {err}")


def run_case(batch, context, topk, q_len, sweep, value_dtype):
    g = torch.Generator(device="cuda").manual_seed(context + topk)
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=DTYPE, generator=g)
    q = torch.randn(batch, Q_HEADS, q_len, HEAD_DIM, device="cuda", dtype=DTYPE, generator=g)
    rotation = torch.linalg.qr(torch.randn(KV_HEADS, HEAD_DIM, HEAD_DIM, device="cuda", generator=g))[0].to(DTYPE)
    cache = CompressedKVCache.from_dense(k, v, topk, value_dtype=value_dtype)
    if batch * context <= 16 * 32768:
        check(cache, q, topk, rotation)
    kv, ki, vc = cache.views()
    own = (kv, ki, vc, cache.scale_view())
    scale = HEAD_DIM ** -0.5

    def sfa(buffers=own, projection=None, **kw):
        """One decode call over ``buffers`` (key values, key indices, values, value scales or None)."""
        *views, scales = buffers
        return triton_decode.decode(q, *views, cache.lengths, topk, scale, None, projection, value_scales=scales,
                                    **kw)

    variants = {"auto": {}}
    if sweep:
        auto = decode_launch.split_config(batch * KV_HEADS, context, Q_HEADS // KV_HEADS * q_len, HEAD_DIM, topk,
                                           False, None, None, None, None, torch.cuda.current_device(), False,
                                           fp8_values=value_dtype is not None)[0]
        variants.update({f"splits={s},block={b},warps={w},stages={st}": dict(num_splits=s, block_n=b, num_warps=w,
                                                                            num_stages=st)
                         for s in sorted({max(1, auto // 2), auto, 2 * auto}) for b in (32, 64, 128) for w in (2, 4)
                         for st in (2, 3)})
    times = {}
    for name, kw in variants.items():
        try:
            times[name] = bench(lambda kw=kw: sfa(**kw))
        except RuntimeError as err:  # a sweep variant Triton cannot compile: reported, not timed
            print(f"  skipped {name}: {str(err).splitlines()[0][:80]}", flush=True)
    best = min(times, key=times.get)
    host_us = host_time(sfa)
    sfa_graph = bench_graph(sfa)
    projected_graph = bench_graph(lambda: sfa(projection=rotation))
    sfa_bytes, dense_bytes = cache.nbytes, 2 * k.numel() * k.element_size()
    copies = cold_copies(sfa_bytes)
    if copies == 1:
        sfa_cold = sfa_graph
    else:
        caches = [[None if t is None else t.clone() for t in own] for _ in range(copies)]  # lengths: read only, shared
        sfa_cold = bench_graph_cold([lambda c=c: sfa(c) for c in caches])
        del caches
    dense = {name: dense_times(q, k, v, name, copies) for name in BACKENDS}
    fastest_dense = min(t[0] for t in dense.values() if t[0] == t[0])
    fastest_graph = min(t[1] for t in dense.values() if t[1] == t[1])
    fastest_cold = min(t[2] for t in dense.values() if t[2] == t[2])
    return dict(batch=batch, context=context, topk=topk, q_len=q_len, flash_ms=dense["flash"][0],
                cudnn_ms=dense["cudnn"][0], sfa_ms=times["auto"], best_ms=times[best], best_variant=best,
                speedup=fastest_dense / times["auto"], best_speedup=fastest_dense / times[best],
                flash_graph_ms=dense["flash"][1], cudnn_graph_ms=dense["cudnn"][1], sfa_graph_ms=sfa_graph,
                graph_speedup=fastest_graph / sfa_graph, sfa_r_graph_ms=projected_graph,
                r_graph_speedup=fastest_graph / projected_graph, cold_copies=copies,
                flash_cold_ms=dense["flash"][2], cudnn_cold_ms=dense["cudnn"][2], sfa_cold_ms=sfa_cold,
                cold_speedup=fastest_cold / sfa_cold,
                byte_ratio=dense_bytes / sfa_bytes, sfa_tbs=sfa_bytes / times["auto"] / 1e9,
                sfa_graph_tbs=sfa_bytes / sfa_graph / 1e9, dense_tbs=dense_bytes / fastest_dense / 1e9,
                host_us=host_us)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--cases", nargs="+", default=["16x32768", "16x131072", "1x8192", "1x131072"])
    parser.add_argument("--query-length", type=int, default=1)
    parser.add_argument("--fp8-values", action="store_true", help="SFA's cache holds FP8 values (per-row scales)")
    parser.add_argument("--sweep", action="store_true")
    add_arguments(parser)
    args = parser.parse_args()
    ceiling = copy_bandwidth()
    value_dtype = torch.float8_e4m3fn if args.fp8_values else None
    report = Report("bench_decode_fp8" if args.fp8_values else "bench_decode",
                    "Decode over the compressed key cache" + (" with FP8 values" if args.fp8_values else "")
                    + " (benchmarks/bench_decode.py" + (" --fp8-values)" if args.fp8_values else ")"), args)
    values = "SFA values FP8 e4m3fn with a float32 scale per token and key head" if args.fp8_values else "bf16"
    report.line(f"{provenance(torch.cuda.get_device_name())}; GQA {Q_HEADS}/{KV_HEADS}, d {HEAD_DIM}, {values}, "
                f"query length {args.query_length}; copy bandwidth {ceiling:.2f} TB/s. graph: GPU time replayed from "
                "a CUDA graph; cold graph: each call reads its cache from HBM, as a model's decode step does")
    report.line()
    report.line("| batch | context | topk | flash ms | cuDNN ms | SFA ms | SFA vs best dense | graph: flash / cuDNN / "
                "SFA / SFA + R ms | graph: SFA, SFA + R vs best dense | cold graph (copies): flash / cuDNN / SFA ms | "
                "cold graph: SFA vs best dense | byte ratio | SFA TB/s (% of copy), graph | dense TB/s | "
                "host us/call | best variant (speedup) |")
    report.line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for topk in args.topks:
        for case in args.cases:
            batch, context = map(int, case.split("x"))
            r = run_case(batch, context, topk, args.query_length, args.sweep, value_dtype)
            report.row(r, f"| {batch} | {context} | {topk} | {r['flash_ms']:.3f} | {r['cudnn_ms']:.3f} "
                          f"| {r['sfa_ms']:.3f} | {r['speedup']:.2f}x | {r['flash_graph_ms']:.3f} / "
                          f"{r['cudnn_graph_ms']:.3f} / {r['sfa_graph_ms']:.3f} / {r['sfa_r_graph_ms']:.3f} "
                          f"| {r['graph_speedup']:.2f}x, {r['r_graph_speedup']:.2f}x | ({r['cold_copies']}) "
                          f"{r['flash_cold_ms']:.3f} / {r['cudnn_cold_ms']:.3f} / {r['sfa_cold_ms']:.3f} "
                          f"| {r['cold_speedup']:.2f}x | {r['byte_ratio']:.2f} | {r['sfa_graph_tbs']:.2f} "
                          f"({100 * r['sfa_graph_tbs'] / ceiling:.0f}%) | {r['dense_tbs']:.2f} | {r['host_us']:.0f} "
                          f"| {r['best_variant']} ({r['best_speedup']:.2f}x) |")
            torch.cuda.empty_cache()
    report.finish(plot=plot_decode)


def plot_decode(figure, rows) -> None:
    """Cold-graph latency against context per batch and topk, and the cache bytes per sequence and layer."""
    lines = {}
    for batch, topk in sorted({(r["batch"], r["topk"]) for r in rows}):
        group = [r for r in rows if (r["batch"], r["topk"]) == (batch, topk)]
        lines[f"SFA topk {topk}, batch {batch}"] = [(r["context"], r["sfa_cold_ms"]) for r in group]
        for name in ("flash", "cudnn"):
            lines.setdefault(f"{name}, batch {batch}", [(r["context"], r[f"{name}_cold_ms"]) for r in group])
    log_log_lines(figure.add_subplot(1, 2, 1), lines, "decode step, cold cache (lower is better)", "context (tokens)",
                  "ms")
    contexts = sorted({r["context"] for r in rows})
    dense = {"dense bf16 K + V": [(c, c * KV_HEADS * 2 * HEAD_DIM * 2 / 2**20) for c in contexts]}
    ratios = {r["topk"]: r["byte_ratio"] for r in rows}  # dense bytes / SFA bytes, whatever the value dtype
    sfa = {f"SFA topk {topk}": [(c, c * KV_HEADS * 2 * HEAD_DIM * 2 / ratio / 2**20) for c in contexts]
           for topk, ratio in sorted(ratios.items())}
    log_log_lines(figure.add_subplot(1, 2, 2), dense | sfa, "cache bytes per sequence and layer", "context (tokens)",
                  "MiB")


if __name__ == "__main__":
    main()
