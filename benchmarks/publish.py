"""A benchmark's table as it runs, and where it goes afterwards: shared by the benchmark scripts.

Each script prints its provenance line and markdown table row by row through a ``Report``. With ``--out DIR`` the
report also writes DIR/<name>.md (title, provenance, table, plot link), DIR/<name>.csv (one row per measured
case) and DIR/<name>.png (when the script draws a plot and matplotlib is installed). With ``--publish`` it
refreshes the script's section of benchmarks/RESULTS.md (between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``),
benchmarks/results/<name>.csv and benchmarks/plots/<name>.png: how RESULTS.md's current tables are written.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="also write <name>.md, .csv and .png into this directory")
    parser.add_argument("--publish", action="store_true",
                        help="refresh this benchmark's section of benchmarks/RESULTS.md, its CSV and its plot")


def commit() -> str:
    """The checkout's short commit, '+dirty' when tracked code differs from it (tables, plots and notes do not
    count); $BENCH_COMMIT when set (whoever copied the tree names its commit: a copy's .git may be stale), 'unknown'
    outside git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        code = ["--", ":(top)", ":(top,exclude)*.md", ":(top,exclude)benchmarks/results",
                ":(top,exclude)benchmarks/plots"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *code], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def provenance(device: str) -> str:
    """Date, device, the versions that decide the numbers, and the commit."""
    import torch

    parts = [str(datetime.date.today()), device, f"torch {torch.__version__}"]
    for module in ("triton", "transformers", "onnxruntime"):  # those the benchmark imported
        if module in sys.modules:
            parts.append(f"{module} {sys.modules[module].__version__}")
    if torch.cuda.is_available() and torch.backends.cudnn.is_available():
        parts.append(f"cuDNN {torch.backends.cudnn.version()}")
    return ", ".join(parts) + f", commit {commit()}"


class Report:
    """A benchmark's markdown output: ``line`` prints and keeps text, ``row`` also keeps the case's measurements;
    ``finish`` writes what ``--out`` / ``--publish`` asked for."""

    def __init__(self, name: str, title: str, args):
        self.name, self.title, self.args = name, title, args
        self.lines: list = []
        self.rows: list = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def row(self, measurements: dict, text: str) -> None:
        self.line(text)
        self.rows.append(measurements)

    def finish(self, plot=None) -> None:
        """``plot(axes_figure)`` draws the rows into a matplotlib figure (called only when one is wanted)."""
        out = Path(self.args.out) if self.args.out else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            image = self._write(out / f"{self.name}.csv", out / f"{self.name}.png", plot)
            (out / f"{self.name}.md").write_text(self._section(image and image.name) + "\n")
            print(f"wrote {out / self.name}.md", flush=True)
        if self.args.publish:
            image = self._write(HERE / "results" / f"{self.name}.csv", HERE / "plots" / f"{self.name}.png", plot)
            replace_section(RESULTS, self.name, self._section(image and f"plots/{image.name}"))
            print(f"refreshed the {self.name} section of {RESULTS}", flush=True)

    def _section(self, image) -> str:
        body = [f"## {self.title}", "", *self.lines]
        if image:
            body += ["", f"![{self.title}]({image})"]
        return "\n".join(body)

    def _write(self, csv_path: Path, png_path: Path, plot):
        if self.rows:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            with open(csv_path, "w", newline="") as f:
                fields = list(dict.fromkeys(key for row in self.rows for key in row))  # rows may add columns
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        if plot is None or not self.rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'sfa-compile[demo]')", flush=True)
            return None
        png_path.parent.mkdir(parents=True, exist_ok=True)
        figure = plt.figure(figsize=(9, 4.5))
        plot(figure, self.rows)
        figure.tight_layout()
        figure.savefig(png_path, dpi=110)
        plt.close(figure)
        return png_path


def replace_section(path: Path, name: str, section: str) -> None:
    """Put ``section`` between NAME's markers in the markdown file ``path`` (appended with markers if absent)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)


def log_log_axes(axes, title: str, xlabel: str, ylabel: str) -> None:
    """Both axes logarithmic, labels, title, legend and grid: the style of every line plot here."""
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(True, which="both", alpha=0.3)


def log_log_lines(axes, lines: dict, title: str, xlabel: str, ylabel: str) -> None:
    """One line per label -> [(x, y), ...] into ``axes``, styled by ``log_log_axes``."""
    for label, points in lines.items():
        if points:
            axes.plot(*zip(*sorted(points)), marker="o", label=label)
    log_log_axes(axes, title, xlabel, ylabel)
