"""The demo's report: ``report.md`` with every measured number, ``fidelity.png`` (embedding cosine and retrieval
agreement vs topk, plain and calibrated) and ``cache.png`` (K+V cache bytes and score work vs topk), written
atomically to the output directory; and the summary the command prints."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from .demo import DemoResult


def _fidelity_table(result: DemoResult) -> list[str]:
    lines = ["| topk | cosine, plain top-k | cosine, calibrated | retrieval, plain | retrieval, calibrated "
             "| K+V cache vs dense | with FP8 values | score work vs dense | calibration s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r.topk} | {r.plain_cosine:.4f} | {r.calibrated_cosine:.4f} | {r.plain_retrieval:.1%} "
                     f"| {r.calibrated_retrieval:.1%} | {r.cache_ratio:.3f} "
                     f"| {'-' if r.fp8_cache_ratio is None else f'{r.fp8_cache_ratio:.3f}'} | {r.score_ratio:.3f} "
                     f"| {r.calibration_seconds:.1f} |")
    return lines


def _onnx_table(result: DemoResult) -> list[str]:
    onnx = result.onnx
    lines = [f"FlashSFA plugin: {onnx['plugin']}.", "",
             "| ONNX Runtime (CPU) | max error vs torch (relative) | whole model, "
             f"{onnx['long_length']} tokens, ms | time vs dense |", "|---|---|---|---|"]
    dense = onnx["seconds"]["dense"]
    for name, seconds in onnx["seconds"].items():
        error = onnx["parity"].get(name)
        lines.append(f"| {name} | {'-' if error is None else f'{error:.1e}'} | {seconds * 1e3:.1f} "
                     f"| {seconds / dense:.2f}x |")
    return lines


def markdown(result: DemoResult) -> str:
    size = result.size
    refine = "" if size.refine_steps is None else f", refine_steps={size.refine_steps}"
    lines = [
        f"# SFA on {result.model_name}",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; every number below was measured in this run ({result.seconds:.0f} s).",
        "",
        "## Attention sites (`sfa_compile.explain`)",
        "",
        "```",
        result.sites_table,
        "```",
        "",
        f"## Fidelity and cost (head dim {result.head_dim})",
        "",
        f"Mean cosine between SFA and dense sentence embeddings over {size.held_out_sentences} held-out built-in "
        f"sentences; retrieval = share of them whose nearest neighbour is the dense model's. Calibrated: "
        f"`sfa_compile.convert(model, SFAConfig(topk), calibration{refine})` on {size.calibration_sentences} other "
        f"sentences (principal axes, then layer-local Eq. 8 refinement). Cache: key/value bytes per token and "
        f"head (bf16 values, uint8 indices; then FP8 values with a float32 scale, `SFACache(model, value_dtype="
        f"torch.float8_e4m3fn)`) against a dense bf16 cache; score work: multiply-adds per query-key "
        f"score. topk = "
        f"{result.head_dim} keeps every feature: it is dense attention, exactly.",
        "",
        *_fidelity_table(result),
        "",
        "![fidelity](fidelity.png) ![cache](cache.png)",
        "",
        "## torch.compile",
        "",
        f"`torch.compile(dense_model, backend=\"sfa\", options={{\"topk\": {result.compiled_topk}}})` (Inductor, "
        f"{result.compile_seconds:.0f} s to compile and run) against the plain top-k converted model: lowest "
        f"embedding cosine over the held-out sentences {result.compiled_min_cosine:.6f} (the same computation; "
        "where two features tie in magnitude, float rounding in the fused kernels can pick the other one).",
        "",
        f"## ONNX (calibrated, topk {result.compiled_topk})",
        "",
        *_onnx_table(result),
        "",
    ]
    return "\n".join(lines)


def _plots(result: DemoResult, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topks = [r.topk for r in result.rows]
    fig, (cosine, retrieval) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, plain, calibrated in (("embedding cosine", "plain_cosine", "calibrated_cosine"),
                                    ("retrieval agreement", "plain_retrieval", "calibrated_retrieval")):
        axis = cosine if name == "embedding cosine" else retrieval
        axis.plot(topks, [getattr(r, plain) for r in result.rows], "o-", label="plain top-k")
        axis.plot(topks, [getattr(r, calibrated) for r in result.rows], "s-", label="calibrated")
        axis.set_xlabel("topk")
        axis.set_title(f"{name} vs dense")
        axis.set_xticks(topks)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"{result.model_name}, head dim {result.head_dim}")
    fig.tight_layout()
    fig.savefig(directory / "fidelity.png", dpi=110)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(topks, [r.cache_ratio for r in result.rows], "o-", label="K+V cache bytes")
    fp8 = [(r.topk, r.fp8_cache_ratio) for r in result.rows if r.fp8_cache_ratio is not None]
    axis.plot(*zip(*fp8), "^-", label="K+V cache bytes, FP8 values")
    axis.plot(topks, [r.score_ratio for r in result.rows], "s-", label="score multiply-adds")
    axis.axhline(1.0, color="gray", linestyle="--", label="dense")
    axis.set_xlabel("topk")
    axis.set_ylabel("SFA / dense")
    axis.set_xticks(topks)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(directory / "cache.png", dpi=110)
    plt.close(fig)


def write_report(result: DemoResult, out, force: bool) -> Path:
    """report.md and the plots in directory ``out``, atomically; refuses an existing ``out`` unless ``force``."""
    from .conversion.checkpoint import atomic_directory

    def write(tmp: Path) -> None:
        (tmp / "report.md").write_text(markdown(result))
        _plots(result, tmp)

    return atomic_directory(out, force, write)


def summary(result: DemoResult) -> str:
    """What the command prints at the end: the fidelity table and the headline numbers."""
    onnx = result.onnx
    lines = [f"{result.sites_rewritten} of {result.sites} attention sites rewritten", "",
             *_fidelity_table(result), "",
             f"torch.compile(backend='sfa') vs the converted model: lowest embedding cosine "
             f"{result.compiled_min_cosine:.6f}",
             *_onnx_table(result)]
    if onnx["plugin"] != "loaded":
        lines.append("(build the plugin with: sfa-compile build-plugin --fetch-headers)")
    return "\n".join(lines)
