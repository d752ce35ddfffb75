"""Hand-written attention variants the backend must rewrite, and look-alikes it must leave untouched."""

import math

import pytest
import torch
import torch.nn.functional as F
from rewritten import flash_sfa_calls
from sfa_oracle import oracle_sfa

import sfa_compile

B, H, L, D = 2, 4, 6, 8


def qkv(heads_kv=H):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, heads_kv, L, D, generator=g),
            torch.randn(B, heads_kv, L, D, generator=g))


def causal_tril():
    return torch.ones(L, L, dtype=torch.bool).tril()


# Each positive variant: (function of q, k, v) and the SFA expectation at topk=3 with the oracle's kwargs.
POSITIVE = {
    "matmul_transpose_div_sqrt": (lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v,
                                  {}),
    "einsum": (lambda q, k, v: torch.einsum("bhij,bhjd->bhid",
                                            torch.einsum("bhid,bhjd->bhij", q, k).mul(D ** -0.5).softmax(-1), v), {}),
    "bmm_mT_3d": (lambda q, k, v: torch.bmm(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).mT).softmax(dim=-1),
                                            v.flatten(0, 1)).unflatten(0, (B, H)), {"scale": 1.0}),
    "permute_full_scale": (lambda q, k, v: F.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)) /
                                                     torch.full([], D ** 0.5), dim=-1) @ v, {}),
    "sqrt_tensor_scale": (lambda q, k, v: F.softmax(torch.matmul(q, k.transpose(2, 3)) /
                                                    torch.sqrt(torch.tensor(float(D))), dim=-1) @ v, {}),
    "masked_fill_tril": (lambda q, k, v: F.softmax((q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(
        ~causal_tril(), float("-inf")), dim=-1) @ v, {"is_causal": True}),
    "where_finfo_min_fp32_softmax": (lambda q, k, v: F.softmax(torch.where(
        causal_tril(), q @ k.transpose(-1, -2) * D ** -0.5, torch.finfo(torch.float32).min), dim=-1,
        dtype=torch.float32).to(q.dtype) @ v, {"is_causal": True}),
    "repeat_interleave_gqa": (lambda q, k, v: F.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3,
                                                        -1) @ v.repeat_interleave(2, dim=1),
                              {"scale": 0.3, "enable_gqa": True}),
}


def _inplace_div_falcon(q, k, v):
    scores = q @ k.transpose(-1, -2)
    scores /= math.sqrt(D)  # Falcon's eager attention
    return F.softmax(scores, dim=-1) @ v


def _inplace_mul_add_mask(q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3))
    scores *= 0.3
    scores += ADDITIVE_CAUSAL
    return F.softmax(scores, dim=-1) @ v


ADDITIVE_CAUSAL = torch.zeros(L, L).masked_fill(~causal_tril(), float("-inf"))
POSITIVE["inplace_div_sqrt"] = (_inplace_div_falcon, {})
POSITIVE["inplace_mul_add_mask"] = (_inplace_mul_add_mask, {"scale": 0.3, "attn_mask": ADDITIVE_CAUSAL})


@pytest.mark.parametrize("name", list(POSITIVE))
def test_variant_rewritten(name):
    fn, kwargs = POSITIVE[name]
    q, k, v = qkv(2 if kwargs.get("enable_gqa") else H)
    report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=3))
    assert [s.rewritten for s in report.sites] == [True], report.table()
    if kwargs.get("enable_gqa"):
        assert report.sites[0].gqa_ratio == 2
    torch._dynamo.reset()
    out = torch.compile(fn, backend="sfa", options={"topk": 3, "handoff": "aot_eager"})(q, k, v)
    torch.testing.assert_close(out, oracle_sfa(q, k, v, 3, **kwargs).float(), rtol=1e-5, atol=1e-6)


def _other_dim(q, k, v):
    return F.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


def _scores_reused(q, k, v):
    s = q @ k.transpose(-1, -2)
    return F.softmax(s, dim=-1) @ v + s.mean()


def _weights_returned(q, k, v):
    p = F.softmax(q @ k.transpose(-1, -2), dim=-1)
    return p @ v, p


def _mask_before_scale(q, k, v):
    return F.softmax((q @ k.transpose(-1, -2) + torch.triu(torch.ones(L, L), 1) * -1e9) * 0.3, dim=-1) @ v


def _fill_not_minus_inf(q, k, v):
    return F.softmax((q @ k.transpose(-1, -2)).masked_fill(~causal_tril(), -1e4), dim=-1) @ v


def _scale_is_tensor(q, k, v):
    return F.softmax(q @ k.transpose(-1, -2) * q.mean(), dim=-1) @ v


def _probs_scaled(q, k, v):
    return (F.softmax(q @ k.transpose(-1, -2), dim=-1) * 2.0) @ v


def _not_transposed(q, k, v):
    return F.softmax(q @ k.reshape(B, H, D, L), dim=-1) @ v


NEGATIVE = {
    "softmax over queries": (_other_dim, "softmax over dim"),
    "scores reused": (_scores_reused, "have other users"),
    "weights returned": (_weights_returned, "have other users"),
    "mask before scale": (_mask_before_scale, "mask is applied before the scale"),
    "fill -1e4": (_fill_not_minus_inf, "not -inf or a dtype minimum"),
    "scale from data": (_scale_is_tensor, "scale is neither a finite constant nor a traced float"),
    "probabilities scaled": (_probs_scaled, "not @ v"),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_lookalike_refused_and_untouched(name):
    fn, reason = NEGATIVE[name]
    q, k, v = qkv()
    report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=3))
    assert len(report.sites) == 1 and not report.sites[0].rewritten and reason in report.sites[0].reason, report.table()
    torch._dynamo.reset()
    out = torch.compile(fn, backend="sfa", options={"topk": 3, "handoff": "aot_eager"})(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))


def test_mask_mutated_in_place_is_refused():
    """``mask += scores`` mutates the mask, which the caller may read again: the site stays dense and the mask
    ends as eager mode leaves it."""
    def fn(q, k, v, mask):
        mask += q @ k.transpose(-1, -2) * 0.3
        return F.softmax(mask, dim=-1) @ v

    q, k, v = qkv()
    mask = torch.zeros(B, H, L, L).masked_fill(~causal_tril(), float("-inf"))
    report = sfa_compile.explain(fn, q, k, v, mask.clone(), sfa_config=sfa_compile.SFAConfig(topk=3))
    assert len(report.sites) == 1 and not report.sites[0].rewritten, report.table()
    torch._dynamo.reset()
    compiled_mask, eager_mask = mask.clone(), mask.clone()
    out = torch.compile(fn, backend="sfa", options={"topk": 3, "handoff": "aot_eager"})(q, k, v, compiled_mask)
    torch.testing.assert_close(out, fn(q, k, v, eager_mask))
    torch.testing.assert_close(compiled_mask, eager_mask)


def test_matmul_without_transpose_is_not_attention():
    q, k, v = qkv()
    assert sfa_compile.explain(_not_transposed, q, k, v).sites == []


def test_dropout_in_training_becomes_op_dropout():
    q, k, v = qkv()
    fn = lambda q, k, v: F.dropout(F.softmax(q @ k.transpose(-1, -2), -1), p=0.25, training=True) @ v  # noqa: E731
    calls = flash_sfa_calls(fn, q, k, v, topk=3)
    assert len(calls) == 1 and calls[0].args[5] == 0.25 and calls[0].args[9] is not None


class TrilBufferAttention(torch.nn.Module):
    """Classic GPT-2: a causal mask sliced from a registered tril buffer, filled with the dtype minimum."""

    def __init__(self, max_len=16):
        super().__init__()
        self.register_buffer("bias", torch.ones(max_len, max_len, dtype=torch.bool).tril().view(1, 1, max_len, max_len))

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5)
        q_len, k_len = q.size(-2), k.size(-2)
        causal = self.bias[:, :, k_len - q_len:k_len, :k_len]
        scores = torch.where(causal, scores, torch.full([], torch.finfo(scores.dtype).min))
        return torch.matmul(F.softmax(scores, dim=-1).type(v.dtype), v)


def test_registered_tril_buffer_mask():
    q, k, v = qkv()
    module = TrilBufferAttention()
    report = sfa_compile.explain(module, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=3))
    assert [(s.rewritten, s.mask) for s in report.sites] == [(True, "bool")], report.table()
    torch._dynamo.reset()
    out = torch.compile(module, backend="sfa", options={"topk": 3, "handoff": "aot_eager"})(q, k, v)
    torch.testing.assert_close(out, oracle_sfa(q, k, v, 3, is_causal=True).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", ["masked_fill", "where"])
def test_dtype_minimum_fill_keeps_eager_meaning_on_fully_masked_rows(fill):
    """With a finite fill (HF's dtype minimum) eager mode mixes all values uniformly in a row whose keys are all
    masked; the rewrite must too (a -inf mask would give zeros there)."""
    keep = causal_tril().clone()
    keep[2] = False  # row 2 attends to nothing
    minimum = torch.finfo(torch.float32).min

    def fn(q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.5
        if fill == "masked_fill":
            scores = scores.masked_fill(~keep, minimum)
        else:
            scores = torch.where(keep, scores, minimum)
        return F.softmax(scores, dim=-1) @ v

    q, k, v = qkv()
    want = fn(q, k, v)
    torch.testing.assert_close(want[:, :, 2], v.mean(-2).expand_as(want[:, :, 2]))
    report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=D))
    assert [s.rewritten for s in report.sites] == [True], report.table()
    torch._dynamo.reset()
    got = torch.compile(fn, backend="sfa", options={"topk": D, "handoff": "aot_eager"})(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
