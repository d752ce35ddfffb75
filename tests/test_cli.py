import subprocess
import sys

from sfa_compile.cli import main
from sfa_compile.demo import run_demo


def test_demo_identity_and_monotone_quality():
    identity_error, rows = run_demo(length=64, head_dim=32, topks=(4, 16, 32))
    assert identity_error < 1e-5
    sqnr = [r.sqnr_db for r in rows]
    assert sqnr == sorted(sqnr) and rows[-1].sqnr_db > 100
    # Compressed keys (bf16 values + uint8 indices) plus dense V, relative to dense K + V.
    assert abs(rows[0].kv_cache_ratio - (4 * 3 + 32 * 2) / (2 * 32 * 2)) < 1e-9


def test_demo_command_prints_table(capsys):
    assert main(["demo", "--length", "64", "--head-dim", "32"]) == 0
    out = capsys.readouterr().out
    assert "reproduces SDPA" in out and "SQNR dB" in out


def test_console_module_entry():
    proc = subprocess.run([sys.executable, "-m", "sfa_compile", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout
