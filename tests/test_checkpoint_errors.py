"""Bad checkpoints and failing writes: one clear error naming the file and the field, nothing half-written."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from hf_models import build

import sfa_compile


def _saved(tmp_path, name="llama", topk=4):
    model, inputs, _, _ = build(name, "eager")
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=topk), progress=False)
    sfa_compile.save(model, tmp_path / "ckpt")
    return model, inputs, tmp_path / "ckpt"


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_config_json_must_be_a_json_object(tmp_path):
    _, _, path = _saved(tmp_path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object, got list"):
        sfa_compile.load(path)
    (path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        sfa_compile.load(path)


@pytest.mark.parametrize("field,value,message", [
    ("topk", 64, r"'sfa\.topk' 64 exceeds the head dim 16 of layer"),
    ("topk", 0, r"topk must be an integer >= 1, got 0"),
    ("topk", -2, r"topk must be an integer >= 1, got -2"),
    ("topk", "4", r"topk must be an integer >= 1, got '4'"),
    ("topk", True, r"topk must be an integer >= 1, got True"),
    ("projection", "sideways", r"'sfa\.projection' must be"),
    ("converted_layers", {}, r"'sfa\.converted_layers' must map"),
    ("converted_layers", {"model.layers.0.self_attn": [4, 3, 16]}, r"converted_layers\['model\.layers\.0"),
    ("unknown", 1, r"unknown SFAConfig field"),
])
def test_sfa_settings_are_checked_before_building(tmp_path, field, value, message):
    """Through sfa_compile.load and through a plain from_pretrained alike: at load, not at the first forward."""
    model, _, path = _saved(tmp_path)
    _edit_config(path, lambda c: c["sfa"].__setitem__(field, value))
    with pytest.raises(ValueError, match=message) as err:
        sfa_compile.load(path)
    assert "config.json" in str(err.value)
    with pytest.raises(ValueError, match=message):
        type(model).from_pretrained(path)


def test_sfa_section_must_be_an_object(tmp_path):
    _, _, path = _saved(tmp_path)
    _edit_config(path, lambda c: c.__setitem__("sfa", 5))
    with pytest.raises(ValueError, match=r"config\.json: 'sfa' must be a JSON object, got int"):
        sfa_compile.load(path)


def test_truncated_weights_name_the_file(tmp_path):
    _, _, path = _saved(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        sfa_compile.load(path)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum(1)


def test_plain_module_checkpoint_without_settings(tmp_path):
    model = _Tiny()
    converted = sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), example=(torch.randn(1, 5, 16),),
                                    progress=False)
    sfa_compile.save(converted, tmp_path / "ckpt")
    settings = tmp_path / "ckpt" / "sfa_model.json"
    data = json.loads(settings.read_text())
    del data["sfa"]["converted_sites"]
    settings.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"sfa_model\.json lacks the SFA settings \['converted_sites'\]"):
        sfa_compile.load(tmp_path / "ckpt", model=_Tiny())
    settings.write_text(json.dumps({"sfa": {**data["sfa"], "converted_sites": {}, "topk": "x"}}))
    with pytest.raises(ValueError, match=r"sfa_model\.json: 'sfa' settings: SFAConfig\.topk"):
        sfa_compile.load(tmp_path / "ckpt", model=_Tiny())


def test_forced_save_rolls_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    model, inputs, path = _saved(tmp_path)
    before = sorted(p.name for p in path.iterdir())
    weights = (path / "model.safetensors").read_bytes()
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.startswith(".ckpt.tmp-"):  # the new checkpoint moving into place
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        sfa_compile.save(model, path, force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no hidden leftovers
    assert sorted(p.name for p in path.iterdir()) == before
    assert (path / "model.safetensors").read_bytes() == weights
    assert sfa_compile.load(path) is not None


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_convert_leaves_a_shared_config_alone(name):
    """A second model built from the same config object stays dense and unconverted."""
    model, inputs, _, _ = build(name, "eager")
    shared = model.config
    twin = type(model)(shared).eval()
    twin.load_state_dict(model.state_dict())
    before = twin.config.to_dict()
    with torch.no_grad():
        dense = twin(**inputs)[0]
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), progress=False)
    assert model.config is not shared and model.config.sfa
    assert twin.config is shared and twin.config.to_dict() == before and not getattr(shared, "sfa", None)
    assert all(m.__dict__.get("config") is not shared for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs)[0], dense)


def test_plain_from_pretrained_without_sfa_compile_fails_loudly(tmp_path):
    """Without ``import sfa_compile`` transformers cannot rebuild the SFA layers: it must refuse, not quietly
    build a dense model."""
    _, _, path = _saved(tmp_path)
    assert json.loads((path / "config.json").read_text())["attn_implementation"] == "sfa"
    code = ("import sys, transformers\n"
            f"transformers.LlamaForCausalLM.from_pretrained({str(path)!r})\n"
            "assert 'sfa_compile' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'attn_implementation="sfa"' in result.stderr
