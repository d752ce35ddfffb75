import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Inductor's on-disk caches key custom ops by name only (pytorch/pytorch#144344): a graph compiled against another
# checkout's sfa::flash_sfa would be reused. Each test session compiles into a cache of its own.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sfa-tests-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

if not torch.cuda.is_available():
    # Triton kernels under test run on the CPU through Triton's interpreter (DESIGN.md section 5). Set before
    # any kernel module is imported: @triton.jit reads it when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    return t


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty and torch.empty_like in the code under test comes back filled with NaN (floats) or True
    (bools), so a kernel output tile that is never written fails the test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: _poison(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: _poison(real_empty_like(*args, **kwargs)))


@pytest.fixture(scope="session")
def ort_plugin():
    """Path of the built FlashSFA ONNX Runtime plugin. Skips where it cannot be built (no compiler or ONNX Runtime
    headers) unless SFA_REQUIRE_ORT_PLUGIN=1, as CI sets after fetching the headers: there it fails."""
    from sfa_compile.exporters.ort_plugin import PluginUnavailable, build_plugin

    try:
        return build_plugin()
    except PluginUnavailable as exc:
        if os.environ.get("SFA_REQUIRE_ORT_PLUGIN") == "1":
            pytest.fail(f"SFA_REQUIRE_ORT_PLUGIN=1 but the plugin is unavailable: {exc}")
        pytest.skip(str(exc))
