"""Top-k sparsification of q and k on the GPU: each Triton search vs a device copy and torch.topk + scatter, one run.

Per head dim and topk, on one (tokens / N, heads, N, d) tensor: every search of ``sparsify_triton`` (checked equal to
``sparsify_dense`` first), the search the rule picks, ``torch.topk`` + scatter (what a user would write), and a
device-to-device copy of the same tensor (the bandwidth ceiling: the same bytes read and written). Reported: ms for q
and k together, the achieved bandwidth (read x, write x~) and its share of the copy's. Issue #31's bar: at least 60%
of HBM bandwidth, under 0.35 ms for q + k at d = 128, 64k tokens x 16 heads.

    python benchmarks/bench_topk.py [--dims 64 128] [--topks 4 8 16 32] [--tokens 65536] [--out DIR] [--publish]
"""

import argparse
import functools

import torch
import triton
from publish import Report, add_arguments, provenance

from sfa_compile.kernels.topk import sparsify_dense
from sfa_compile.kernels.triton_topk import INF_PATTERN, SEARCHES, default_search, sparsify_triton


def bench_pair(sparsify, q, k) -> float:
    """Median ms of ``sparsify`` on q and then k."""
    return triton.testing.do_bench(lambda: (sparsify(q), sparsify(k)), warmup=25, rep=100, return_mode="median")


def torch_topk(x, topk):
    """What a user would write (its ties may fall on other features than the lower index)."""
    kept = x.abs().topk(topk, dim=-1).indices
    return torch.zeros_like(x).scatter_(-1, kept, x.gather(-1, kept))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--topks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096, help="sequence length (batch = tokens / length)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_topk: needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    searches = [s for s in SEARCHES if s == "bit" or dtype in INF_PATTERN]
    report = Report("bench_topk", "Top-k of q and k on the GPU (benchmarks/bench_topk.py)", args)
    report.line(f"{provenance(torch.cuda.get_device_name())}; {args.dtype}, {args.tokens} tokens x {args.heads} heads "
                f"(batch {args.tokens // args.length} x {args.length}); ms for q and k; bandwidth counts reading x and "
                "writing x~; 'vs copy' is the share of a device-to-device copy of the same tensors")
    report.line()
    report.line("| d | topk | variant | q+k ms | TB/s | vs copy |")
    report.line("|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for head_dim in args.dims:
        q, k = (torch.randn(args.tokens // args.length, args.heads, args.length, head_dim, device="cuda", dtype=dtype,
                            generator=g) for _ in range(2))
        moved = 2 * 2 * q.numel() * q.element_size()  # q and k, each read once and written once
        copy_ms = bench_pair(torch.clone, q, k)
        report.row(dict(d=head_dim, topk=0, variant="copy", ms=copy_ms, tb_s=moved / copy_ms / 1e9, vs_copy=1.0),
                   f"| {head_dim} | - | device copy | {copy_ms:.3f} | {moved / copy_ms / 1e9:.2f} | 100% |")
        for topk in args.topks:
            if topk > head_dim:
                continue
            want = sparsify_dense(q, topk)[0]
            variants = {f"triton {s}" + (" (rule)" if s == default_search(dtype, topk) else ""):
                        functools.partial(sparsify_triton, topk=topk, search=s) for s in searches}
            for name, sparsify in list(variants.items()):
                try:
                    got = sparsify(q)
                except Exception as err:  # noqa: BLE001 - a search Triton cannot compile here: reported, not timed
                    report.line(f"| {head_dim} | {topk} | {name} | failed: {str(err).splitlines()[0][:80]} | | |")
                    del variants[name]
                    continue
                if not torch.equal(got.nan_to_num(), want.nan_to_num()):
                    raise SystemExit(f"bench_topk: {name} disagrees with sparsify_dense (d={head_dim}, topk={topk})")
            variants["torch.topk + scatter"] = functools.partial(torch_topk, topk=topk)
            for name, sparsify in variants.items():
                ms = bench_pair(sparsify, q, k)
                report.row(dict(d=head_dim, topk=topk, variant=name, ms=ms, tb_s=moved / ms / 1e9,
                                vs_copy=copy_ms / ms),
                           f"| {head_dim} | {topk} | {name} | {ms:.3f} | {moved / ms / 1e9:.2f} | "
                           f"{copy_ms / ms:.0%} |")
    report.finish(plot_share_of_copy)


def plot_share_of_copy(figure, rows) -> None:
    """Per head dim, each variant's share of the copy's bandwidth against topk."""
    dims = sorted({row["d"] for row in rows})
    for column, head_dim in enumerate(dims, 1):
        axes = figure.add_subplot(1, len(dims), column)
        lines = {}
        for row in rows:
            if row["d"] == head_dim and row["topk"]:
                lines.setdefault(row["variant"].replace(" (rule)", ""), []).append((row["topk"], 100 * row["vs_copy"]))
        for label, points in lines.items():
            axes.plot(*zip(*sorted(points)), marker="o", label=label)
        axes.axhline(60, color="gray", linestyle="--", linewidth=1, label="issue #31 bar (60%)")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("topk")
        axes.set_ylabel("% of device-copy bandwidth")
        axes.set_title(f"top-k of q and k, d = {head_dim}", fontsize=10)
        axes.legend(fontsize=7)
        axes.grid(True, which="both", alpha=0.3)


if __name__ == "__main__":
    main()
