"""Building and loading the FlashSFA ONNX Runtime plugin, and what happens without it."""

import onnx
import pytest
import torch
from onnx_cases import relative_error, run, single_node_model

from sfa_compile import ort_session
from sfa_compile.cli import main as cli_main
from sfa_compile.exporters import ort_plugin
from sfa_compile.exporters.ort_plugin import PluginUnavailable, build_plugin, find_include_dir


@pytest.fixture
def no_headers(monkeypatch, tmp_path):
    """A machine without ONNX Runtime headers anywhere we look."""
    monkeypatch.delenv("SFA_ORT_INCLUDE", raising=False)
    monkeypatch.setenv("SFA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_plugin, "SYSTEM_INCLUDE_DIRS", [])


def _node_model(tmp_path):
    path = tmp_path / "node.onnx"
    onnx.save(single_node_model(3, 0.5, True, 4), path)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 2, 5, 5)
    full = mask.masked_fill(torch.ones(5, 5).triu(1).bool(), -torch.inf)
    expected = torch.ops.sfa.flash_sfa(q, k, v, 3, full, 0.0, False, 0.5, False, None)[0].numpy()
    return path, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()}, expected


def test_missing_headers_error_says_what_to_install(no_headers, tmp_path):
    with pytest.raises(PluginUnavailable, match="no ONNX Runtime headers.*--fetch-headers.*SFA_ORT_INCLUDE"):
        build_plugin()
    with pytest.raises(PluginUnavailable, match="has no onnxruntime_cxx_api.h"):
        build_plugin(tmp_path)


def test_a_named_include_directory_without_headers_is_refused_not_replaced(no_headers, tmp_path, monkeypatch, capsys):
    found = ort_plugin._fetched_headers()  # headers where the search would find them by itself
    found.mkdir(parents=True)
    (found / "onnxruntime_cxx_api.h").write_text("")
    assert find_include_dir() == found
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PluginUnavailable, match=f"the include directory {empty} has no onnxruntime_cxx_api.h"):
        find_include_dir(empty)
    assert cli_main(["build-plugin", "--include-dir", str(empty)]) == 1
    assert f"{empty} has no onnxruntime_cxx_api.h" in capsys.readouterr().err
    monkeypatch.setenv("SFA_ORT_INCLUDE", str(empty))
    with pytest.raises(PluginUnavailable, match=r"\$SFA_ORT_INCLUDE .* has no onnxruntime_cxx_api.h"):
        find_include_dir()
    assert find_include_dir(found) == found  # the argument comes before the environment


def test_session_without_plugin_falls_back_to_function_body(no_headers, tmp_path):
    path, feeds, expected = _node_model(tmp_path)
    with pytest.raises(PluginUnavailable, match="no ONNX Runtime headers"):
        ort_session(path, plugin=True)
    with pytest.warns(UserWarning, match="no ONNX Runtime headers.*function body"):
        session = ort_session(path)
    out = session.run(["out"], feeds)[0]
    assert relative_error(out, expected) <= 1e-4
    with pytest.raises(ValueError, match="plugin must be"):
        ort_session(path, plugin="yes")


def test_plugin_builds_once_and_runs(ort_plugin, tmp_path):
    assert build_plugin() == ort_plugin  # cached: same key, no rebuild
    path, feeds, expected = _node_model(tmp_path)
    (out, lse), ran = run(path, feeds, plugin=True)
    assert "FlashSFA" in ran and relative_error(out, expected) <= 1e-4


def test_compiler_failure_is_reported(ort_plugin, monkeypatch, tmp_path):
    include = find_include_dir()
    monkeypatch.setenv("SFA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(PluginUnavailable, match="building the FlashSFA plugin failed"):
        build_plugin(include)
    assert not list(tmp_path.rglob("*.so"))


def test_cli_build_plugin(ort_plugin, capsys):
    assert cli_main(["build-plugin"]) == 0
    assert capsys.readouterr().out.strip() == str(ort_plugin)


def test_cli_build_plugin_without_headers(no_headers, capsys):
    assert cli_main(["build-plugin"]) == 1
    assert "no ONNX Runtime headers" in capsys.readouterr().err


def test_half_precision_models_run_on_the_function_body(tmp_path):
    """The plugin computes float32: a float16 model gets the function body, with one warning (auto), or a clear
    refusal (plugin=True), instead of ONNX Runtime's INVALID_GRAPH."""
    path = tmp_path / "half.onnx"
    onnx.save(single_node_model(3, 0.5, False, 4, onnx.TensorProto.FLOAT16), path)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g).half() for _ in range(3))
    mask = torch.zeros(1, 2, 5, 5, dtype=torch.half)
    expected = torch.ops.sfa.flash_sfa(q.float(), k.float(), v.float(), 3, None, 0.0, False, 0.5, False, None)[0]
    with pytest.raises(PluginUnavailable, match="computes float32 .* take float16"):
        ort_session(path, plugin=True)
    with pytest.warns(UserWarning, match="take float16: running FlashSFA through its ONNX function body"):
        session = ort_session(path)
    out = session.run(["out"], {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()})[0]
    assert out.dtype.name == "float16" and relative_error(out.astype("float32"), expected.numpy()) <= 2e-3
