"""The README's quickstart runs as written: every code block marked ``<!-- runnable -->``, in order, in one
namespace, in a scratch directory."""

import pathlib
import re
import warnings

import torch

README = pathlib.Path(__file__).parent.parent / "README.md"


def runnable_blocks() -> list[str]:
    return re.findall(r"<!-- runnable -->\n```python\n(.*?)```", README.read_text(), re.S)


def test_quickstart_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = runnable_blocks()
    assert len(blocks) >= 5  # op, backend, convert + save/load, generate, ONNX
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. ort_session's note when the plugin cannot be built here
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    # What the blocks promise, checked on what they left behind.
    assert namespace["out"].shape == (1, 8, 128, 64)
    assert namespace["logits"].shape == (2, 16, 128)
    assert namespace["sfa_model"].config.sfa["topk"] == 4 and (tmp_path / "sfa-llama" / "config.json").is_file()
    assert namespace["tokens"].shape == (2, 24) and namespace["cache"].nbytes > 0
    with torch.no_grad():
        want = namespace["sfa_model"](input_ids=namespace["ids"]).logits.numpy()
    got = namespace["onnx_logits"]
    assert got.shape == want.shape and abs(got - want).max() <= 1e-3 * abs(want).max()


def test_readme_stays_a_short_user_document():
    words = len(README.read_text().split())
    assert words <= 1200, f"README.md has {words} words (the user document stays under ~1,200; details go to docs/)"
