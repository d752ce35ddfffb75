"""ONNX export: one com.sfa::FlashSFA node per attention, the function body as exact fallback, dynamic shapes,
converted Hugging Face models run by ONNX Runtime with and without the plugin."""

import copy
import os
import re

import numpy as np
import onnx
import pytest
import torch
from hf_models import build
from onnx_cases import relative_error, run, single_node_model

import sfa_compile
from sfa_compile.cli import main as cli_main
from sfa_compile.exporters.onnx_export import flash_sfa_nodes
from sfa_compile.exporters.onnx_function import DOMAIN, OP_NAME

TOL = 1e-4  # the bar: fp32, relative to the output's magnitude


class Attention(torch.nn.Module):
    """flash_sfa on raw q/k/v, a scale the export must carry, and a little arithmetic after it."""

    def __init__(self, topk, causal=False, gqa=False, scale=None):
        super().__init__()
        self.topk, self.causal, self.gqa, self.scale = topk, causal, gqa, scale

    def forward(self, q, k, v, mask=None):
        out = sfa_compile.flash_sfa(q, k, v, topk=self.topk, attn_mask=mask, is_causal=self.causal,
                                    enable_gqa=self.gqa, scale=self.scale)
        return out * 2 + 1


def _qkv(b, h, hk, length, s, e, ev, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, e, generator=g), torch.randn(b, hk, s, e, generator=g),
            torch.randn(b, hk, s, ev, generator=g))


def _mask(kind, b, h, length, s, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        mask = torch.rand(b, 1, length, s, generator=g) > 0.3
        mask[..., 0] = True
        return mask
    if kind == "float":
        return torch.randn(1, h, length, s, generator=g)
    return None


@pytest.mark.parametrize("causal,gqa,mask_kind,scale", [(True, True, None, 0.3), (False, False, "bool", 0.25),
                                                        (False, True, "float", None)])
def test_op_export_one_node_dynamic_shapes_and_fallback(tmp_path, causal, gqa, mask_kind, scale):
    hk = 2 if gqa else 4
    e = 24
    model = Attention(5, causal, gqa, scale)
    q, k, v = _qkv(2, 4, hk, 5, 5 if causal else 7, e, 8, seed=0)
    mask = _mask(mask_kind, 2, 4, 5, k.shape[2], seed=1)
    args = (q, k, v) if mask is None else (q, k, v, mask)
    auto = torch.export.Dim.AUTO
    batch_and_length = {0: auto, 2: auto}  # the default scale 1/sqrt(head dim) needs a static head dim
    dynamic = {"q": batch_and_length, "k": batch_and_length, "v": batch_and_length, "mask": {2: auto, 3: auto}}
    kwargs = {} if scale is not None else {"dynamic_shapes": dynamic}
    path = tmp_path / "attention.onnx"
    proto = sfa_compile.export_onnx(model, args, path, **kwargs)

    nodes = flash_sfa_nodes(proto)
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["topk"] == 5 and attrs["causal"] == int(causal)
    assert attrs["scale"] == pytest.approx(scale if scale is not None else e ** -0.5)
    assert [(f.domain, f.name) for f in proto.functions] == [(DOMAIN, OP_NAME)]
    onnx.checker.check_model(onnx.load(path), full_check=True)

    # Other batch and lengths than the example: the shapes stayed dynamic.
    q, k, v = _qkv(3, 4, hk, 9, 9 if causal else 11, e, 8, seed=2)
    mask = _mask(mask_kind, 3, 4, 9, k.shape[2], seed=3)
    feeds = dict(zip(("q", "k", "v", "mask"), (t.numpy() for t in (q, k, v, mask) if t is not None)))
    expected = model(*(t for t in (q, k, v, mask) if t is not None)).numpy()
    (out,), ran = run(path, feeds, plugin=False)
    assert OP_NAME not in ran and "TopK" in ran  # the function body ran
    assert relative_error(out, expected) <= TOL


@pytest.mark.parametrize("topk,causal,length,s,mask_rank", [(3, False, 7, 5, 4), (8, True, 6, 6, 2),
                                                            (1, True, 9, 4, 3), (24, False, 4, 6, 0)])
@pytest.mark.parametrize("plugin", [False, True], ids=["function", "plugin"])
def test_node_matches_flash_sfa(tmp_path, request, plugin, topk, causal, length, s, mask_rank):
    """The node itself (function body or plugin) against sfa_compile.flash_sfa: odd sizes, GQA 3, causal with
    L != S (top-left aligned), broadcast masks of every rank, a fully hidden row (zeros, lse = +inf)."""
    if plugin:
        request.getfixturevalue("ort_plugin")
    b, h, hk, e, ev = 2, 6, 2, 24, 40  # ev: two 16-column register tiles and 8 leftover columns
    q, k, v = _qkv(b, h, hk, length, s, e, ev, seed=topk)
    g = torch.Generator().manual_seed(7)
    mask_shape = [b, h, length, s][4 - mask_rank:]
    mask = torch.where(torch.rand(mask_shape, generator=g) > 0.25, torch.randn(mask_shape, generator=g), -torch.inf)
    if mask_rank == 0:
        mask = torch.tensor(0.3)
    if mask_rank >= 2:
        mask[..., 1, :] = -torch.inf  # query row 1 sees no key
    path = tmp_path / "node.onnx"
    onnx.save(single_node_model(topk, 0.37, causal, mask_rank), path)
    (out, lse), ran = run(path, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()}, plugin)
    assert (OP_NAME in ran) == plugin

    # The node takes a mask and the causal flag together (the torch op takes one of them): fold causal in.
    full_mask = mask + torch.zeros(length, s).masked_fill(torch.ones(length, s).triu(1).bool() & causal, -torch.inf)
    expected, expected_lse = torch.ops.sfa.flash_sfa(q, k, v, topk, full_mask, 0.0, False, 0.37, True, None)[:2]
    assert out.shape == (b, h, length, ev) and lse.shape == (b, h, length)
    assert relative_error(out, expected.numpy()) <= TOL
    finite = torch.isfinite(expected_lse).numpy()
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert relative_error(lse[finite], expected_lse.numpy()[finite]) <= TOL
    if mask_rank >= 2:
        assert np.all(out[:, :, 1] == 0) and np.all(np.isposinf(lse[:, :, 1]))


def test_plugin_reports_bad_mask_instead_of_crashing(tmp_path, ort_plugin):
    path = tmp_path / "node.onnx"
    onnx.save(single_node_model(4, 0.5, False, 4), path)
    q, k, v = _qkv(1, 2, 2, 3, 5, 8, 8, seed=0)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": np.zeros((1, 2, 3, 4), np.float32)}
    with pytest.raises(Exception, match="attn_mask dim 3 of size 4 does not broadcast to 5"):
        run(path, feeds, plugin=True)


# (query, key, value, mask shapes, topk) the plugin refuses; the function body must refuse them too.
BAD_NODE_INPUTS = {
    "mask_rank_5": ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 1, 2, 3, 5), 4),
    "mask_not_broadcasting": ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 3, 4), 4),
    "mask_batch_too_big": ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (2, 1, 3, 5), 4),
    "query_rank_5": ((1, 1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 1, 1, 1), 4),
    "heads_not_a_multiple": ((1, 3, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 1, 1, 1), 4),
    "topk_above_head_dim": ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 1, 1, 1), 9),
    "value_length_differs": ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 4, 8), (1, 1, 1, 1), 4),
}


@pytest.mark.parametrize("plugin", [False, True], ids=["function", "plugin"])
@pytest.mark.parametrize("case", sorted(BAD_NODE_INPUTS))
def test_function_body_refuses_what_the_plugin_refuses(tmp_path, request, case, plugin):
    if plugin:
        request.getfixturevalue("ort_plugin")
    q_shape, k_shape, v_shape, m_shape, topk = BAD_NODE_INPUTS[case]
    path = tmp_path / "node.onnx"
    onnx.save(single_node_model(topk, 0.5, False, len(m_shape), ranked=False), path)
    g = np.random.default_rng(0)
    feeds = {n: g.standard_normal(s).astype(np.float32) for n, s in zip("qkv", (q_shape, k_shape, v_shape))}
    feeds["mask"] = np.zeros(m_shape, np.float32)
    with pytest.raises(Exception, match="FlashSFA"):
        run(path, feeds, plugin=plugin)


def _converted(name):
    model, inputs, sites, head_dim = build(name, "eager")
    model.eval()
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=head_dim // 4), [inputs], progress=False)
    return model, inputs, sites


def _feeds(batch, length, padded):
    """input_ids, and with ``padded`` an attention mask with the first and last rows padded."""
    g = torch.Generator().manual_seed(11)
    feeds = {"input_ids": torch.randint(0, 100, (batch, length), generator=g)}
    if padded:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length - 4:] = 0
        mask[-1, 3:] = 0
        feeds["attention_mask"] = mask
    return feeds


@pytest.mark.parametrize("plugin", [False, True], ids=["function", "plugin"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_converted_hf_models_run_in_onnxruntime(tmp_path, request, name, plugin):
    """GPT-2 (folded projections), Llama (RoPE, GQA, runtime projections R), BERT (padding mask): ONNX Runtime
    equals torch at another batch and length than the export's."""
    if plugin:
        request.getfixturevalue("ort_plugin")
    model, inputs, sites = _converted(name)
    assert model.config.sfa["projection"] == ("runtime" if name == "llama" else "folded")
    path = tmp_path / f"{name}.onnx"
    use_cache = getattr(model.config, "use_cache", None)
    proto = sfa_compile.export_onnx(model, (), path, kwargs=inputs)  # causal LMs: no KV cache in the outputs
    assert len(flash_sfa_nodes(proto)) == sites
    assert len(proto.graph.output) == (2 if name == "bert" else 1)  # hidden states (+ pooled), no cache
    assert getattr(model.config, "use_cache", None) == use_cache  # left as it was

    feeds = _feeds(batch=3, length=13, padded="attention_mask" in inputs)
    with torch.no_grad():
        expected = model(**feeds)[0].numpy()
    outputs, ran = run(path, {k: v.numpy() for k, v in feeds.items()}, plugin)
    assert (OP_NAME in ran) == plugin
    assert relative_error(outputs[0], expected) <= TOL


def test_export_refuses_dense_models_and_low_opsets_and_writes_nothing(tmp_path):
    model, inputs, _, _ = build("bert", "sdpa")
    path = tmp_path / "dense.onnx"
    with pytest.raises(ValueError, match="runs no FlashSFA.*convert it first"):
        sfa_compile.export_onnx(model, (), path, kwargs=inputs)
    with pytest.raises(ValueError, match="opset must be >= 18"):
        sfa_compile.export_onnx(model, (), path, kwargs=inputs, opset=17)
    assert os.listdir(tmp_path) == []


def test_export_keeps_training_mode_and_refuses_dynamic_head_dim_without_scale(tmp_path):
    model = Attention(4).train()
    q, k, v = _qkv(1, 2, 2, 3, 3, 8, 8, seed=0)
    with pytest.raises(Exception, match="head dim is dynamic"):
        sfa_compile.export_onnx(model, (q, k, v), tmp_path / "a.onnx")
    assert model.training and os.listdir(tmp_path) == []


def test_cli_export(tmp_path, capsys):
    model, _, sites = _converted("llama")
    sfa_compile.save(model, tmp_path / "ckpt")
    out = tmp_path / "llama.onnx"
    assert cli_main(["export", str(tmp_path / "ckpt"), "-o", str(out), "--length", "8"]) == 0
    assert f"exported {sites} FlashSFA nodes" in capsys.readouterr().out
    proto = onnx.load(out)
    assert len(flash_sfa_nodes(proto)) == sites
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    before = out.read_bytes()
    assert cli_main(["export", str(tmp_path / "ckpt"), "-o", str(out)]) == 1
    assert "already exists (pass --force to overwrite it)" in capsys.readouterr().err
    assert out.read_bytes() == before

    feeds = _feeds(batch=2, length=11, padded=True)
    loaded = sfa_compile.load(tmp_path / "ckpt")
    with torch.no_grad():
        expected = loaded(**feeds)[0].numpy()
    (logits,), _ = run(out, {k: v.numpy() for k, v in feeds.items()}, plugin=False)
    assert relative_error(logits, expected) <= TOL


def test_export_leaves_the_model_unchanged():
    """Training mode is restored and the weights are untouched; path=None returns the model without writing."""
    model, inputs, _ = _converted("gpt2")
    before = copy.deepcopy(model.state_dict())
    model.train()
    sfa_compile.export_onnx(model, (), None, kwargs=inputs)
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_cli_export_refuses_models_without_token_inputs(tmp_path, capsys):
    model, inputs, _, _ = build("vit", "eager")
    sfa_compile.convert(model.eval(), sfa_compile.SFAConfig(topk=4), [inputs], progress=False)
    sfa_compile.save(model, tmp_path / "vit")
    assert cli_main(["export", str(tmp_path / "vit"), "-o", str(tmp_path / "vit.onnx")]) == 1
    assert re.search("takes other inputs.*export_onnx", capsys.readouterr().err)
    assert not (tmp_path / "vit.onnx").exists()
