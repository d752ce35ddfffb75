"""ONNX files with external data are replaced as a pair: a failure at any step leaves the old pair consistent."""

import os

import numpy as np
import onnx
import pytest
import torch
from onnx_cases import run

import sfa_compile
from sfa_compile.exporters import onnx_export


class _Scaled(torch.nn.Module):
    """flash_sfa after a linear layer, so the export has initializers to put in a side file."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        q = self.proj(x).view(1, 2, 5, 8)
        return sfa_compile.flash_sfa(q, q, q, topk=4, scale=0.3)


def _export(seed, path):
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    model = _Scaled(seed).eval()
    sfa_compile.export_onnx(model, (x,), path, dynamic_shapes=({},))
    with torch.no_grad():
        return x, model(x).numpy()


def _runs(path, x, expected):
    (out,), _ = run(path, {onnx.load(path, load_external_data=False).graph.input[0].name: x.numpy()}, plugin=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _side_file_always(monkeypatch):
    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 0)


def test_reexport_replaces_the_pair_and_removes_the_old_side_file(tmp_path):
    path = tmp_path / "m.onnx"
    _export(1, path)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    x, expected = _export(2, path)
    side = set(os.listdir(tmp_path)) - {"m.onnx"}
    assert len(side) == 1 and onnx_export._external_files(path) == side
    _runs(path, x, expected)


@pytest.mark.parametrize("failing", [1, 2])  # the side file's move, the model file's move (the commit)
def test_failed_reexport_leaves_the_old_pair(tmp_path, monkeypatch, failing):
    path = tmp_path / "m.onnx"
    x, expected = _export(1, path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(onnx_export.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        _export(2, path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    _runs(path, x, expected)
