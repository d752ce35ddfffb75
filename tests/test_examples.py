"""The scripts in examples/ run as documented (CPU, small settings) and print what their docstrings promise."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_shows_the_identity_and_the_compressed_keys():
    out = run("quickstart.py")
    assert "topk= 64  cosine to dense = 1.0000  (topk = head dim: dense attention, exactly)" in out
    cosines = [float(c) for c in re.findall(r"cosine to dense = ([0-9.]+)", out)]
    assert len(cosines) == 4 and cosines == sorted(cosines)  # more kept features, closer to dense
    assert "compressed keys: 24576 bytes vs 65536 dense" in out  # 256 tokens x 2 heads x 16 x (2 + 1) bytes


def test_finetune_trains_saves_and_reloads(tmp_path):
    out = run("finetune.py", "--steps", "3", "--out", str(tmp_path / "sfa-llama"))
    assert "over 3 steps on 1 process(es)" in out and "reloaded model matches: True" in out
