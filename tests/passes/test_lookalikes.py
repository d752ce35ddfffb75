"""Adversarial look-alikes: code shaped like attention that is not, compiled with backend="sfa" and its default
hand-off to Inductor, must compute exactly what eager computes; sites that reach q @ k^T are reported dense
with a reason. Plus the call forms and constants that used to crash the compile, and true attention written in
them, which must be rewritten exactly."""

import math
import operator

import pytest
import torch
import torch.nn.functional as F

import sfa_compile
from sfa_compile.passes.constants import constant_value

B, H, L, D = 2, 3, 6, 6  # L == D, so products over the wrong axis still have valid shapes


def qkv(requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def causal():
    return torch.ones(L, L, dtype=torch.bool).tril()


def kt(k):
    return k.transpose(-1, -2)


def _written_after_scores(q, k, v):
    q = q.clone()
    scores = q @ kt(k)
    q.mul_(2)
    return F.softmax(scores, -1) @ v


def _narrowed(q, k, v):
    return F.softmax((q @ kt(k)).half().float(), -1) @ v


LOOKALIKES = {
    # softmax over an axis other than the keys
    "softmax over queries": lambda q, k, v: F.softmax(q @ kt(k) / math.sqrt(D), dim=-2) @ v,
    "softmax over heads": lambda q, k, v: F.softmax(q @ kt(k), dim=1) @ v,
    "softmax over batch": lambda q, k, v: torch.softmax(q @ kt(k), 0) @ v,
    "softmax of transposed scores": lambda q, k, v: F.softmax((q @ kt(k)).transpose(-1, -2), dim=-1) @ v,
    "implicit-dim softmax": lambda q, k, v: F.softmax(q @ kt(k), dim=None, _stacklevel=5) @ v,
    # products that are not q @ k^T or p @ v
    "k not transposed": lambda q, k, v: F.softmax(q @ k, dim=-1) @ v,
    "probabilities on the right": lambda q, k, v: v @ F.softmax(q @ kt(k), dim=-1),
    "probabilities transposed": lambda q, k, v: F.softmax(q @ kt(k), -1).transpose(-1, -2) @ v,
    "einsum diagonal of q": lambda q, k, v: torch.einsum(
        "bhij,bhjd->bhid", torch.einsum("bhdd,bhjd->bhdj", q, k).softmax(-1), v),
    "einsum diagonal of v": lambda q, k, v: torch.einsum(
        "bhij,bhjj->bhij", torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1), v),
    "einsum scores transposed": lambda q, k, v: torch.einsum(
        "bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhji", q, k).softmax(-1), v),
    "einsum summed over batch": lambda q, k, v: torch.einsum(
        "hij,bhjd->bhid", torch.einsum("bhid,bhjd->hij", q, k).softmax(-1), v),
    "einsum implicit output": lambda q, k, v: torch.einsum(
        "bhij,bhjd->bhid", torch.einsum("bhid,bhjd", q, k).reshape(1, 1, L, L).expand(B, H, L, L).softmax(-1), v),
    "einsum p v over the wrong axis": lambda q, k, v: torch.einsum(
        "bhij,bhid->bhjd", torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1), v),
    # casts that change values
    "scores through int": lambda q, k, v: F.softmax((q @ kt(k) * 3).to(torch.int32).to(torch.float32), -1) @ v,
    "scores through bool": lambda q, k, v: F.softmax((q @ kt(k)).bool().float(), -1) @ v,
    "probabilities through int": lambda q, k, v: (F.softmax(q @ kt(k), -1) * 4).long().float() @ v,
    "scores .type(IntTensor)": lambda q, k, v: F.softmax((q @ kt(k) * 3).type(torch.IntTensor).float(), -1) @ v,
    # one value in two roles, values reused
    "scores as their own mask": lambda q, k, v: (lambda s: F.softmax(s + s, dim=-1) @ v)(q @ kt(k)),
    "scores masked by their own sign": lambda q, k, v: (lambda s: F.softmax(
        s.masked_fill(s < 0, float("-inf")), -1) @ v)(q @ kt(k)),
    "scores reused": lambda q, k, v: (lambda s: F.softmax(s, dim=-1) @ v + s.mean())(q @ kt(k)),
    "probabilities reused": lambda q, k, v: (lambda p: p @ v + p.sum(-1, keepdim=True))(F.softmax(q @ kt(k), -1)),
    "probabilities times themselves": lambda q, k, v: (lambda p: (p * p) @ v)(F.softmax(q @ kt(k), -1)),
    # scales, masks and fills the op cannot express
    "mask before scale": lambda q, k, v: F.softmax((q @ kt(k) + torch.triu(torch.ones(L, L), 1) * -1e9) * 0.3,
                                                   -1) @ v,
    "fill -1e4": lambda q, k, v: F.softmax((q @ kt(k)).masked_fill(~causal(), -1e4), -1) @ v,
    "fill nan": lambda q, k, v: F.softmax((q @ kt(k)).masked_fill(~causal(), float("nan")), -1) @ v,
    "fill zero with where": lambda q, k, v: F.softmax(torch.where(causal(), q @ kt(k), 0.0), -1) @ v,
    "multiplicative mask": lambda q, k, v: F.softmax(q @ kt(k) * causal().float(), -1) @ v,
    "scale from data": lambda q, k, v: F.softmax(q @ kt(k) * q.mean(), -1) @ v,
    "reciprocal of scores": lambda q, k, v: F.softmax(2.0 / (q @ kt(k)), -1) @ v,
    "scores minus mask": lambda q, k, v: F.softmax(q @ kt(k) - causal().float(), -1) @ v,
    "add with alpha": lambda q, k, v: F.softmax(torch.add(q @ kt(k), causal().float(), alpha=-3.0), -1) @ v,
    "per-head scale": lambda q, k, v: F.softmax(q @ kt(k) * torch.tensor([1.0, 2.0, 3.0]).view(H, 1, 1), -1) @ v,
    "scale of several elements": lambda q, k, v: F.softmax(q @ kt(k) * torch.full((L, L), 0.5), -1) @ v,
    "mask broadcasting larger": lambda q, k, v: F.softmax(q[0] @ kt(k[0]) + torch.zeros(B, H, L, L), -1) @ v,
    "soft-capped logits": lambda q, k, v: F.softmax(torch.tanh(q @ kt(k) / 5.0) * 5.0, -1) @ v,
    "negative sqrt scale": lambda q, k, v: F.softmax(q @ kt(k) / torch.sqrt(torch.tensor(-1.0)), -1) @ v,
    "division by zero": lambda q, k, v: F.softmax(q @ kt(k) / torch.tensor(0.0), -1) @ v,
    "rounding division": lambda q, k, v: F.softmax(torch.div(q @ kt(k), 0.5, rounding_mode="floor"), -1) @ v,
    # not softmax at all
    "relu attention": lambda q, k, v: F.relu(q @ kt(k)) @ v,
    "log_softmax": lambda q, k, v: F.log_softmax(q @ kt(k), -1) @ v,
    "softmin": lambda q, k, v: F.softmin(q @ kt(k), -1) @ v,
    "in-place masked_fill_": lambda q, k, v: F.softmax((q @ kt(k)).masked_fill_(~causal(), float("-inf")), -1) @ v,
    "dropout in place": lambda q, k, v: F.dropout(F.softmax(q @ kt(k), -1), 0.0, True, True) @ v,
    "dropout of everything": lambda q, k, v: F.dropout(F.softmax(q @ kt(k), -1), 1.0, True) @ v,
    # values written between the products and the output: the op, placed at the output, would read them late
    "q written after the scores": lambda q, k, v: _written_after_scores(q, k, v),
    "v written after the scores": lambda q, k, v: (lambda v: (lambda s: (v.add_(1), F.softmax(s, -1) @ v)[1])(
        q @ kt(k)))(v.clone()),
    # shapes that broadcast
    "probabilities broadcast over v": lambda q, k, v: F.softmax(q[:1] @ kt(k[:1]), -1) @ v,
}


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
    reasons = {
        "softmax over queries": "softmax over dim -2",
        "scores as their own mask": "fill two roles",
        "scores through int": "unsupported op",
        "fill -1e4": "not -inf or a dtype minimum",
        "soft-capped logits": "soft-capping",
        "negative sqrt scale": "scale is not a finite constant",
        "division by zero": "division by zero",
        "implicit-dim softmax": "no dim",
        "einsum diagonal of v": "not @ v",
        "q written after the scores": "in-place op",
    }
    for name, reason in [*reasons.items(), ("narrowed", "may overflow")]:
        fn = _narrowed if name == "narrowed" else LOOKALIKES[name]
        report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=2))
        assert len(report.sites) == 1 and reason in report.sites[0].reason, (name, report.table())


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


ATTENTION = {"keyword arguments": (_keywords, 0.25), "bf16 constant scale": (_bf16_constant_scale, 0.30078125),
             "bf16 sqrt scale": (_bf16_sqrt_scale, 1 / 2.453125), "T5 cast back": (_t5_cast_back, 1.0),
             "einsum list operands": (_einsum_list_operands, 1.0), "permute by keyword": (_permute_keyword, D ** -0.5)}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_in_every_call_form_is_rewritten_exactly(name):
    fn, scale = ATTENTION[name]
    q, k, v = qkv()
    report = sfa_compile.explain(fn, q, k, v, sfa_config=sfa_compile.SFAConfig(topk=D))
    assert [s.rewritten for s in report.sites] == [True], report.table()
    torch._dynamo.reset()
    got = torch.compile(fn, backend="sfa", options={"topk": D})(q, k, v)
    torch.testing.assert_close(got, fn(q, k, v), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        from sfa_compile.passes.pipeline import run_pipeline
        run_pipeline(gm, sfa_compile.SFAConfig(topk=2))
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture)(q, k, v)
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.sfa.flash_sfa.default]
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
