"""Adversarial look-alikes: code shaped like attention that is not, compiled with backend="sfa" and its default
hand-off to Inductor, must compute exactly what eager computes; sites that reach q @ k^T are reported dense
with a reason. Plus the call forms and constants that used to crash the compile, and true attention written in
them, which must be rewritten exactly."""

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from lookalikes import LOOKALIKES, REFUSAL_REASONS, REFUSED, D, causal, kt, qkv
from rewritten import flash_sfa_calls

import sfa_compile
from sfa_compile.passes.constants import constant_value


def _refused_only(fn, inputs):
    report = sfa_compile.explain(fn, *inputs, sfa_config=sfa_compile.SFAConfig(topk=2))
    assert not any(s.rewritten for s in report.sites), report.table()
    assert all(s.reason for s in report.sites), report.table()


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_lookalike_compiles_to_what_eager_computes(name):
    fn = LOOKALIKES[name]
    q, k, v = qkv()
    want = fn(q, k, v)
    _refused_only(fn, (q, k, v))
    torch._dynamo.reset()
    got = torch.compile(fn, backend="sfa", options={"topk": 2})(q, k, v)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_softmax_over_queries_with_gradients_through_inductor():
    """The training graph (joint forward and backward) must not be rewritten by Inductor either."""
    fn = LOOKALIKES["softmax over queries"]
    q, k, v = qkv(requires_grad=True)
    want = fn(q, k, v)
    grads_want = torch.autograd.grad(want.sum(), (q, k, v))
    torch._dynamo.reset()
    got = torch.compile(fn, backend="sfa", options={"topk": 2})(q, k, v)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), grads_want):
        torch.testing.assert_close(g, w)


def test_refusals_name_their_reason():
    q, k, v = qkv()
    for name, reason in REFUSAL_REASONS.items():
        report = sfa_compile.explain(REFUSED[name], q, k, v, sfa_config=sfa_compile.SFAConfig(topk=2))
        assert len(report.sites) == 1 and reason in report.sites[0].reason, (name, report.table())


def test_a_matcher_error_is_a_refusal_not_a_failed_compile(monkeypatch):
    from sfa_compile.passes import find_handwritten_attention as finder

    def broken(*args):
        raise RuntimeError("unforeseen graph")

    monkeypatch.setattr(finder, "_match_softmax", broken)
    fn = LOOKALIKES["softmax over queries"]
    q, k, v = qkv()
    report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=2))
    assert [(s.rewritten, "could not analyze (RuntimeError: unforeseen graph)" in s.reason)
            for s in report.sites] == [(False, True)], report.table()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="sfa", options={"topk": 2})(q, k, v), fn(q, k, v))


# True attention in the call forms and constants that used to crash the compile or be misread.
def _keywords(q, k, v):
    scores = torch.matmul(input=q, other=k.transpose(-1, -2)) * 0.25
    probs = F.softmax(input=scores.masked_fill(~causal(), value=float("-inf")), dim=-1)
    return torch.matmul(input=probs, other=v)


def _bf16_constant_scale(q, k, v):
    return F.softmax(q @ kt(k) * torch.tensor(0.3, dtype=torch.bfloat16), -1) @ v


def _bf16_sqrt_scale(q, k, v):
    return F.softmax(q @ kt(k) / torch.sqrt(torch.tensor(float(D), dtype=torch.bfloat16)), -1) @ v


def _t5_cast_back(q, k, v):
    scores = torch.matmul(q, k.transpose(3, 2))
    return F.softmax(scores.float(), dim=-1).type_as(scores) @ v


def _einsum_list_operands(q, k, v):
    return torch.einsum("bhij,bhjd->bhid", [torch.einsum("bhid,bhjd->bhij", [q, k]).softmax(dim=-1), v])


def _permute_keyword(q, k, v):
    return F.softmax(torch.matmul(q, k.permute(dims=(0, 1, 3, 2))) * D ** -0.5, dim=-1) @ v


def _length_one_key_expanded(q, k, v):
    """One key repeated along the key length by x.unsqueeze(2).expand(...).reshape(...), the shape of repeat_kv:
    heads are not repeated, so this is not GQA and the repeated keys are the keys."""
    b, h, length, d = k.shape
    k_rep = k[:, :, :1].unsqueeze(2).expand(b, h, 1, length, d).reshape(b, h, length, d)
    v_rep = v[:, :, :1].unsqueeze(2).expand(b, h, 1, length, d).reshape(b, h, length, d)
    return F.softmax(q @ k_rep.transpose(-1, -2), -1) @ v_rep


ATTENTION = {"keyword arguments": (_keywords, 0.25), "bf16 constant scale": (_bf16_constant_scale, 0.30078125),
             "bf16 sqrt scale": (_bf16_sqrt_scale, 1 / 2.453125), "T5 cast back": (_t5_cast_back, 1.0),
             "einsum list operands": (_einsum_list_operands, 1.0), "permute by keyword": (_permute_keyword, D ** -0.5),
             "length-one key expanded": (_length_one_key_expanded, 1.0)}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_in_every_call_form_is_rewritten_exactly(name):
    fn, scale = ATTENTION[name]
    q, k, v = qkv()
    report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=D))
    assert [s.rewritten for s in report.sites] == [True], report.table()
    torch._dynamo.reset()
    got = torch.compile(fn, backend="sfa", options={"topk": D})(q, k, v)
    torch.testing.assert_close(got, fn(q, k, v), rtol=1e-5, atol=1e-5)
    calls = flash_sfa_calls(fn, q, k, v, topk=2)
    assert len(calls) == 1 and calls[0].args[7] == scale


def _graph_constant(build):
    graph = torch.fx.Graph()
    return build(lambda target, *args, **kwargs: graph.call_function(target, args, kwargs))


@pytest.mark.parametrize("build, value", [
    (lambda f: f(torch.tensor, 0.3, dtype=torch.bfloat16), 0.30078125),
    (lambda f: f(torch.full, [], 0.1, dtype=torch.float16), float(torch.tensor(0.1, dtype=torch.float16))),
    (lambda f: f(torch.sqrt, f(torch.tensor, 8.0, dtype=torch.bfloat16)), 2.828125),
    (lambda f: f(operator.truediv, 1.0, f(math.sqrt, 16)), 0.25),
    (lambda f: f(torch.rsqrt, f(torch.full, [1], 4.0, dtype=torch.float64)), 0.5),
    (lambda f: f(torch.sqrt, f(torch.tensor, -1.0)), None),
    (lambda f: f(math.sqrt, -1.0), None),
    (lambda f: f(operator.truediv, f(torch.tensor, 1.0), f(torch.tensor, 0.0)), None),
    (lambda f: f(operator.truediv, 1.0, 0.0), None),
    (lambda f: f(torch.tensor, 2.0 + 1.0j), None),
    (lambda f: f(torch.tensor, True), None),
    (lambda f: f(torch.tensor, [1.0, 2.0]), None),
    (lambda f: f(torch.full, [2], 1.0), None),
    (lambda f: f(torch.randn, []), None),
])
def test_constants_fold_in_their_own_dtype_and_refuse_the_rest(build, value):
    assert constant_value(_graph_constant(build)) == value
