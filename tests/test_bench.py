"""``sfa-compile bench`` end to end at quick size on the CPU suite, and how benchmarks publish their tables."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from publish import replace_section  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the CPU suite; with CUDA the command runs the GPU one")
def test_bench_quick_writes_the_cpu_prefill_table_csv_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "sfa_compile", "bench", "--quick", "--only", "bench_prefill_cpu",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "[1/1] bench_prefill_cpu" in proc.stdout and str(out) in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "bench_prefill_cpu.csv", "bench_prefill_cpu.md",
                                                     "bench_prefill_cpu.png"]
    rows = list(csv.DictReader(open(out / "bench_prefill_cpu.csv")))
    assert [int(r["N"]) for r in rows] == [256, 512]
    for r in rows:  # measured, positive, and the ratio is of the same two timings' order
        assert r["engine"] == "sdpa_cpu_flash"
        assert all(float(r[key]) > 0 for key in ("sdpa_fwd", "sfa_fwd", "sdpa_fwdbwd", "sfa_fwdbwd", "fwd_ratio"))
    results = (out / "RESULTS.md").read_text()
    assert "## Prefill on the CPU" in results and "| 64 | 8 | 512 | sdpa_cpu_flash |" in results
    assert "commit " in results and "torch " in results  # provenance line
    assert (out / "bench_prefill_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publish_replaces_only_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n\n<!-- begin a -->\nold a\n<!-- end a -->\n\nnote on a\n")
    replace_section(results, "a", "new a")
    replace_section(results, "b", "first b")
    replace_section(results, "b", "second b")
    assert results.read_text() == ("# Results\n\nintro\n\n<!-- begin a -->\nnew a\n<!-- end a -->\n\nnote on a\n\n"
                                   "<!-- begin b -->\nsecond b\n<!-- end b -->\n")


@pytest.mark.parametrize("distance", [0, 37, "longest"])
def test_recall_rows_ask_for_the_digit_each_letter_had_in_the_key_list(distance):
    from bench_convert_recall import RECALL_BYTES, recall_row

    distance = 256 - RECALL_BYTES if distance == "longest" else distance
    data = torch.randint(32, 127, (4096,), generator=torch.Generator().manual_seed(0))
    row, targets = recall_row(data, 256, distance, torch.Generator().manual_seed(distance))
    assert len(row) == 257 and bytes(row[:6]) == b"Keys: " and max(targets) <= 256
    pair_bytes = row[6:22:2]
    assert row[7:23:2] == [ord(" ")] * 8 and all(128 <= b < 256 for b in pair_bytes)
    given = {chr(65 + (b - 128) // 10): str((b - 128) % 10) for b in pair_bytes}
    assert len(given) == 8 and set(given) <= set("ABCDEFGHIJKL")  # distinct letters
    assert bytes(row[22 + distance:31 + distance]) == b" Recall: "  # after the 8 pairs and the filler
    recalled = {chr(row[t - 1]): chr(row[t]) for t in targets}
    assert recalled == given and [row[t + 1] for t in targets] == [ord(" ")] * 8


def test_recall_batches_are_recall_rows_shifted_by_one_byte():
    from bench_convert_recall import recall_batch

    data = torch.randint(32, 127, (4096,), generator=torch.Generator().manual_seed(1))
    inputs, targets = recall_batch(data, 5, 128, torch.Generator().manual_seed(2))
    assert inputs.shape == targets.shape == (5, 128)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row in inputs.tolist():
        assert bytes(row[:6]) == b"Keys: " and b" Recall: " in bytes(row[22:])
