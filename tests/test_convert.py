"""Offline conversion of Hugging Face models: projections, calibration, folding, checkpoints, CLI."""

import copy
import json
import os

import pytest
import torch
from hf_models import build, reference_copy, tiny_tokenizer
from safetensors.torch import load_file, save_file

import sfa_compile
from sfa_compile.cli import main as cli_main
from sfa_compile.projection import SFAProjection, orthogonality_error


def converted(name, topk, calibrate=True, **kwargs):
    model, inputs, sites, head_dim = build(name, "eager")
    model.eval()
    dense = copy.deepcopy(model)
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=topk or head_dim), [inputs] if calibrate else None,
                        progress=False, **kwargs)
    return model, dense, inputs, sites, head_dim


def out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("name,projection", [("gpt2", "folded"), ("bert", "folded"), ("vit", "folded"),
                                             ("llama", "runtime"), ("qwen3", "runtime")])
def test_calibrated_rotation_keeps_dense_scores(name, projection):
    """topk = head dim: calibrated R is a rotation, so the converted model equals the dense one."""
    model, dense, inputs, sites, _ = converted(name, None)
    assert model.config.sfa["projection"] == projection and len(model.config.sfa["converted_layers"]) == sites
    torch.testing.assert_close(out(model, inputs), out(dense, inputs), rtol=1e-4, atol=1e-5)
    for m in model.modules():
        if isinstance(m, SFAProjection) and m.weight is not None:
            assert orthogonality_error(m.weight.detach().double()) < 1e-5
            assert not torch.allclose(m.weight, torch.eye(m.head_dim).expand_as(m.weight))  # really calibrated


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_uncalibrated_equals_plain_sfa(name):
    model, dense, inputs, _, _ = converted(name, 4, calibrate=False)
    torch.testing.assert_close(out(model, inputs), out(reference_copy(dense, 4), inputs), rtol=1e-5, atol=1e-6)


def test_folding_equals_runtime_projection():
    folded, _, inputs, _, _ = converted("bert", 4)
    runtime, _, _, _, _ = converted("bert", 4, fold=False)
    assert runtime.config.sfa["projection"] == "runtime"
    torch.testing.assert_close(out(folded, inputs), out(runtime, inputs), rtol=1e-4, atol=1e-5)


def test_layer_filter_and_bad_topk():
    model, inputs, _, head_dim = build("llama", "eager")
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4, layers=r"layers\.0\."), progress=False)
    assert list(model.config.sfa["converted_layers"]) == ["model.layers.0.self_attn"]
    assert not hasattr(model.model.layers[1].self_attn, "sfa")
    with pytest.raises(ValueError, match="exceeds the head dim"):
        sfa_compile.convert(build("llama", "eager")[0], sfa_compile.SFAConfig(topk=head_dim + 1), progress=False)
    with pytest.raises(ValueError, match="matches none"):
        sfa_compile.convert(build("llama", "eager")[0], sfa_compile.SFAConfig(layers="nothing"), progress=False)


def test_bad_calibration_and_config_are_refused_in_one_line():
    model, inputs, _, _ = build("llama", "eager")
    with pytest.raises(ValueError, match="calibration is empty"):
        sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [], progress=False)
    with pytest.raises(TypeError, match="calibration item 1 is of type int"):
        sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [inputs, 3], progress=False)
    with pytest.raises(TypeError, match="config must be an SFAConfig"):
        sfa_compile.convert(model, 4, progress=False)


def test_tokenizer_output_is_an_example_input():
    """A tokenizer's BatchEncoding (a mapping, not a dict) calibrates and fine-tunes as the same dict does."""
    model, _, _, _ = build("llama", "eager")
    twin = copy.deepcopy(model)
    encoded = tiny_tokenizer()(["the module is the file", "a class of the object"], return_tensors="pt",
                               padding=True)
    assert not isinstance(encoded, dict)
    for m, batch in ((model, encoded), (twin, dict(encoded))):
        sfa_compile.convert(m, sfa_compile.SFAConfig(topk=4), [batch], progress=False)
        sfa_compile.finetune(m, [batch], 2, progress=False)
    want, got = model.state_dict(), twin.state_dict()
    assert all(torch.equal(want[name], got[name]) for name in want)


class _Interrupted(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("failure", ["bad batch", "interrupt", "topk"])
def test_failed_conversion_leaves_the_model_as_it_was(failure, monkeypatch):
    """Whatever stops a conversion part way (a batch the model rejects while calibrating, Ctrl-C, a refused
    setting), the model keeps its config objects, attention implementation, modules and outputs."""
    model, inputs, _, head_dim = build("llama", "eager")
    model.train()
    config, attn = model.config, model.config._attn_implementation
    with torch.no_grad():
        before = model.eval()(**inputs)[0]
    model.train()
    topk = head_dim + 1 if failure == "topk" else 4
    bad = {**inputs, "input_ids": inputs["input_ids"].float()}  # the embedding refuses it, in calibration
    calibration = [inputs, bad] if failure == "bad batch" else [inputs]
    if failure == "interrupt":
        def interrupt(*args, **kwargs):
            raise _Interrupted
        monkeypatch.setattr("sfa_compile.conversion.convert.calibrate", interrupt)
    with pytest.raises((_Interrupted, RuntimeError, ValueError)):
        sfa_compile.convert(model, sfa_compile.SFAConfig(topk=topk), calibration, progress=False)
    assert model.training and model.config is config and config._attn_implementation == attn
    assert all(m.config is config for m in model.modules() if "config" in m.__dict__)
    assert not any(hasattr(m, "sfa") for m in model.modules())
    torch.testing.assert_close(out(model.eval(), inputs), before, rtol=0, atol=0)
    monkeypatch.undo()
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [inputs], progress=False)  # and converts afterwards
    assert model.config.sfa["topk"] == 4


def test_distillation_loss_zero_only_when_dense():
    for topk, positive in ((None, False), (4, True)):
        model, _, inputs, _, _ = converted("llama", topk)
        with sfa_compile.attention_distillation(model) as distill:
            model(**inputs)
        loss = distill.loss().item()
        assert (loss > 1e-6) == positive, loss


def test_refinement_lowers_distillation_loss():
    def eq8(model, inputs):
        with torch.no_grad(), sfa_compile.attention_distillation(model) as distill:
            model(**inputs)
            return distill.loss().item()

    pca, _, inputs, _, _ = converted("llama", 3, refine_steps=0)  # principal axes only
    refined, _, _, _, _ = converted("llama", 3, refine_steps=30)
    default, _, _, _, _ = converted("llama", 3)  # convert refines by default
    assert eq8(default, inputs) < eq8(pca, inputs) and eq8(refined, inputs) < eq8(pca, inputs)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_checkpoint_round_trip(tmp_path, name):
    model, _, inputs, _, _ = converted(name, 4)
    sfa_compile.save(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["sfa"]["topk"] == 4
    torch.testing.assert_close(out(sfa_compile.load(tmp_path / "ckpt"), inputs), out(model, inputs))
    # A plain from_pretrained works too (sfa_compile is imported), and its re-save stays loadable.
    plain = type(model).from_pretrained(tmp_path / "ckpt")
    assert plain.config._attn_implementation == "sfa"
    torch.testing.assert_close(out(plain, inputs), out(model, inputs))
    plain.save_pretrained(tmp_path / "again")
    again = type(model).from_pretrained(tmp_path / "again")
    torch.testing.assert_close(out(again, inputs), out(model, inputs))
    assert not getattr(again, "is_quantized", False) and again.half() is again  # no quantization residue


def test_save_is_atomic_and_refuses_overwrite(tmp_path, monkeypatch):
    model, _, _, _, _ = converted("llama", 4)
    target = tmp_path / "ckpt"
    sfa_compile.save(model, target)
    with pytest.raises(FileExistsError, match="--force"):
        sfa_compile.save(model, target)

    def broken(path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        sfa_compile.save(model, tmp_path / "other")
    with pytest.raises(OSError, match="disk full"):
        sfa_compile.save(model, target, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing half-written, old checkpoint intact
    assert sfa_compile.load(target) is not None


def test_load_names_missing_and_mismatched_tensors(tmp_path):
    model, _, _, _, _ = converted("llama", 4)
    sfa_compile.save(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("layers.1.self_attn.sfa.weight"))
    save_file({k: v for k, v in tensors.items() if k != name}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks the projection tensor .*layers\.1\.self_attn\.sfa\.weight"):
        sfa_compile.load(tmp_path / "ckpt")
    save_file({**tensors, name: tensors[name][:, :3].contiguous()}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.sfa\.weight' has shape \(2, 3, 16\)"):
        sfa_compile.load(tmp_path / "ckpt")
    save_file({**tensors, name: 2 * tensors[name]}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.sfa\.weight' is missing or corrupt"):
        sfa_compile.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not an SFA checkpoint"):
        build("llama", "eager")[0].save_pretrained(tmp_path / "dense")
        sfa_compile.load(tmp_path / "dense")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_load_refuses_unsafe_pickle(tmp_path):
    model, _, _, _, _ = converted("bert", 4)
    sfa_compile.save(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    state = {**model.state_dict(), "payload": _Payload(tmp_path / "pwned")}
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only"):
        sfa_compile.load(tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()


def test_cli_convert_and_finetune(tmp_path, capsys):
    model, inputs, _, _ = build("llama", "eager")
    model.save_pretrained(tmp_path / "dense")
    assert cli_main(["convert", str(tmp_path / "dense"), "-o", str(tmp_path / "sfa"), "--calibrate", "8"]) == 1
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "convert with --calibrate 0" in err and not (tmp_path / "sfa").exists()
    assert cli_main(["convert", str(tmp_path / "dense"), "-o", str(tmp_path / "plain"), "--calibrate", "0"]) == 0
    assert cli_main(["finetune", str(tmp_path / "plain"), "-o", str(tmp_path / "tuned")]) == 1  # its text needs one
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "--calibrate" not in err and not (tmp_path / "tuned").exists()
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    # Files that hold no weights travel with the checkpoint (sentence-transformers modules, a README); weights and
    # hidden files do not, and what the save wrote itself (config.json) is not overwritten.
    (tmp_path / "dense" / "README.md").write_text("model card")
    (tmp_path / "dense" / "1_Pooling").mkdir()
    (tmp_path / "dense" / "1_Pooling" / "config.json").write_text("{}")
    (tmp_path / "dense" / "pytorch_model.bin").write_bytes(b"stale weights")
    (tmp_path / "dense" / ".cache").mkdir()
    (tmp_path / "dense" / ".cache" / "x").write_text("x")
    assert cli_main(["convert", str(tmp_path / "dense"), "-o", str(tmp_path / "sfa"), "--topk", "4",
                     "--calibrate", "8"]) == 0
    out = capsys.readouterr().out
    assert "converted 2 attention layers" in out and "calibrated on 8 built-in sentences, tokenizer copied" in out
    assert (tmp_path / "sfa" / "tokenizer.json").is_file()
    assert (tmp_path / "sfa" / "README.md").read_text() == "model card"
    assert (tmp_path / "sfa" / "1_Pooling" / "config.json").is_file()
    assert not (tmp_path / "sfa" / "pytorch_model.bin").exists() and not (tmp_path / "sfa" / ".cache").exists()
    assert "sfa" in json.loads((tmp_path / "sfa" / "config.json").read_text())
    assert cli_main(["convert", str(tmp_path / "dense"), "-o", str(tmp_path / "sfa")]) == 1
    assert "already exists (pass --force to overwrite it)" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "sfa"), "-o", str(tmp_path / "again")]) == 1
    assert "already an SFA checkpoint" in capsys.readouterr().err and not (tmp_path / "again").exists()
    assert cli_main(["finetune", str(tmp_path / "sfa"), "-o", str(tmp_path / "tuned"), "--steps", "3",
                     "--sentences", "8", "--straight-through", "--sparsity-weight", "0.3", "--warmup-topks", "8",
                     "--final-lr-factor", "0.25"]) == 0
    tuned = sfa_compile.load(tmp_path / "tuned")
    before = sfa_compile.load(tmp_path / "sfa")
    assert not torch.equal(tuned.model.layers[0].self_attn.sfa.weight, before.model.layers[0].self_attn.sfa.weight)
    assert tuned.config.sfa["topk"] == tuned.model.layers[0].self_attn.sfa.topk == 4  # not a warm-up value
