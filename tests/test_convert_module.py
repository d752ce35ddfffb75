"""Offline conversion of plain nn.Modules (torch.fx trace + the backend's passes), checkpoints of them."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sfa_oracle import oracle_sfa
from torch import nn

import sfa_compile
from sfa_compile.conversion.modules import SFAAttention
from sfa_compile.projection import orthogonality_error


class HandWrittenGQA(nn.Module):
    """Matmul-softmax-matmul attention with GQA by repeat_interleave, an additive padding mask, a scale computed
    from sizes, nn.Softmax and nn.Dropout modules."""

    def __init__(self, dim=48, heads=6, key_heads=2):
        super().__init__()
        self.heads, self.key_heads, self.head_dim = heads, key_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * key_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.softmax, self.dropout = nn.Softmax(dim=-1), nn.Dropout(0.1)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.key_heads, -1).permute(2, 0, 3, 1, 4)
        group = self.heads // self.key_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5
        probs = self.dropout(self.softmax(scores + padding[:, None, None, :]))
        return self.out((probs @ v).transpose(1, 2).reshape(b, n, -1))


class SdpaBlock(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        return x + self.mlp(x + y)


class TwoModels(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([HandWrittenGQA(), HandWrittenGQA()])
        self.tail = SdpaBlock(48, 3)

    def forward(self, x, padding, scale_output: float = 1.0):
        for layer in self.layers:
            x = x + layer(x, padding)
        return self.tail(x) * scale_output


def inputs(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    padding = torch.zeros(batch, length)
    padding[0, length - 2:] = float("-inf")  # the first sequence is padded
    return torch.randn(batch, length, 48, generator=g), padding


def model():
    torch.manual_seed(0)
    return TwoModels().eval()


SITES = {"layers.0.sfa_attention": [6, 2, 8], "layers.1.sfa_attention": [6, 2, 8], "tail.sfa_attention": [3, 3, 16]}


def test_topk_equal_head_dim_is_the_original_model_at_other_shapes():
    dense = model()
    converted = sfa_compile.convert(dense, sfa_compile.SFAConfig(topk=8, layers="layers"), example=inputs(2, 5, 0))
    assert isinstance(converted, torch.fx.GraphModule)
    assert converted.sfa_settings["converted_sites"] == {k: v for k, v in SITES.items() if k.startswith("layers")}
    assert sum(isinstance(m, SFAAttention) for m in converted.modules()) == 2
    with torch.no_grad():
        for batch, length, seed in ((3, 11, 1), (1, 4, 2)):
            x, padding = inputs(batch, length, seed)
            torch.testing.assert_close(converted(x, padding), dense(x, padding), atol=1e-5, rtol=1e-5)


def test_sparse_sites_equal_the_oracle_with_their_projection():
    dense = model()
    calibration = [inputs(2, 9, s) for s in range(3)]
    converted = sfa_compile.convert(dense, sfa_compile.SFAConfig(topk=3), calibration, progress=False)
    assert converted.sfa_settings["converted_sites"] == SITES
    site = converted.get_submodule("tail.sfa_attention")
    assert orthogonality_error(site.sfa.weight.detach()) < 1e-5
    assert (site.sfa.weight.detach() - torch.eye(16)).abs().max() > 0.1  # calibration moved R

    captured = {}

    def oracle_tail(module, args, output):  # recompute the tail's attention from its q, k, v with the oracle
        q, k, v = args
        r = site.sfa.weight.detach().double()
        expected = oracle_sfa(q.double() @ r, k.double() @ r, v, 3, is_causal=True)
        captured["error"] = (output.double() - expected).abs().max().item()

    handle = site.register_forward_hook(oracle_tail)
    x, padding = inputs(3, 10, 7)
    with torch.no_grad():
        sparse, reference = converted(x, padding), dense(x, padding)
    handle.remove()
    assert captured["error"] < 1e-5
    cosine = F.cosine_similarity(sparse, reference, dim=-1).mean()
    assert 0.5 < cosine < 0.99999  # lossy but related


def test_checkpoint_round_trip_and_errors(tmp_path):
    converted = sfa_compile.convert(model(), sfa_compile.SFAConfig(topk=4), [inputs(2, 6, 3)], progress=False)
    sfa_compile.save(converted, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--force"):
        sfa_compile.save(converted, tmp_path / "ckpt")
    x, padding = inputs(2, 7, 4)
    loaded = sfa_compile.load(tmp_path / "ckpt", model=TwoModels())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, padding), converted(x, padding), atol=0, rtol=0)
    with pytest.raises(TypeError, match="pass an unconverted instance"):
        sfa_compile.load(tmp_path / "ckpt")
    with pytest.raises(TypeError, match="but model= is a .*SdpaBlock"):
        sfa_compile.load(tmp_path / "ckpt", model=SdpaBlock())
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    name = "layers.1.sfa_attention.sfa.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(ValueError, match=r"Missing key.*layers\.1\.sfa_attention\.sfa\.weight"):
        sfa_compile.load(tmp_path / "ckpt", model=TwoModels())
    save_file({**tensors, name: 2 * tensors[name]}, weights)
    with pytest.raises(ValueError, match=r"layers\.1\.sfa_attention\.sfa\.weight' is missing or corrupt"):
        sfa_compile.load(tmp_path / "ckpt", model=TwoModels())


def test_finetune_trains_the_projections_of_a_plain_module():
    dense = model()
    data = [inputs(2, 8, s) for s in range(2)]
    converted = sfa_compile.convert(dense, sfa_compile.SFAConfig(topk=2), example=data[0])
    before = converted.get_submodule("layers.0.sfa_attention").sfa.weight.detach().clone()
    losses = sfa_compile.finetune(converted, data, 20, lr=1e-2, progress=False)
    assert losses[-1] < losses[0]
    after = converted.get_submodule("layers.0.sfa_attention").sfa.weight.detach()
    assert (after - before).abs().max() > 1e-3 and orthogonality_error(after) < 1e-4


class LengthScaled(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-2)), dim=-1) @ v  # scale by the length


class DataDependent(nn.Module):
    def forward(self, q, k, v):
        if q.sum() > 0:
            return F.scaled_dot_product_attention(q, k, v)
        return v


def test_refusals_are_clear():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="traced from an example input"):
        sfa_compile.convert(LengthScaled())
    with pytest.raises(ValueError, match="scale is neither a finite constant nor a traced float"):
        sfa_compile.convert(LengthScaled(), example=(q, q, q))
    with pytest.raises(ValueError, match="could not trace DataDependent.*backend='sfa'"):
        sfa_compile.convert(DataDependent(), example=(q, q, q))
    with pytest.raises(ValueError, match="no attention was found"):
        sfa_compile.convert(nn.Linear(8, 8), example=q)
    with pytest.raises(ValueError, match="exceeds the head dim 8"):
        sfa_compile.convert(SdpaBlock(16, 2), sfa_compile.SFAConfig(topk=9), example=torch.randn(1, 3, 16))
    dense = r"2 attention site\(s\) stay dense: layers\.0 \(topk 9 exceeds the head dim 8\) and 1 more"
    with pytest.warns(UserWarning, match=dense):
        sfa_compile.convert(model(), sfa_compile.SFAConfig(topk=9), example=inputs(1, 3, 0))


def test_heads_folded_into_the_batch_share_one_projection():
    class Bmm(nn.Module):
        def forward(self, q, k, v):
            return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1), v)

    q, k, v = (torch.randn(6, 7, 16) for _ in range(3))
    converted = sfa_compile.convert(Bmm(), sfa_compile.SFAConfig(topk=5), example=(q, k, v))
    assert converted.sfa_settings["converted_sites"] == {"sfa_attention": [1, 1, 16]}
    expected = oracle_sfa(q[:, None], k[:, None], v[:, None], 5, scale=0.25)[:, 0]
    torch.testing.assert_close(converted(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)


def test_converted_module_exports_to_onnx_at_dynamic_shapes(tmp_path):
    converted = sfa_compile.convert(model(), sfa_compile.SFAConfig(topk=4), [inputs(2, 6, 3)], progress=False)
    sfa_compile.export_onnx(converted, inputs(2, 6, 3), tmp_path / "plain.onnx")
    session = sfa_compile.ort_session(tmp_path / "plain.onnx", plugin=False)
    x, padding = inputs(3, 9, 5)
    (out,) = session.run(None, {"x": x.numpy(), "padding": padding.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), converted(x, padding), atol=1e-5, rtol=1e-5)
