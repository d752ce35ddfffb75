"""torch.compile(dynamic=True): attention is rewritten, not left dense, and computes what the model asks for.

Under dynamic=True Dynamo traces a module's float attributes (a scale, a temperature) as graph values and makes
every input size symbolic, the head dim included. The op is then handed the traced float itself, so a changed
attribute is honored on the next call, and a symbolic head dim is compared with topk under a guard, so a head
dim below topk recompiles into dense attention instead of failing.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hf_models import CASES, build, reference_copy
from sfa_oracle import oracle_sfa

TOPK = 4
STRICT = {"topk": TOPK, "strict": True}  # strict: a site left dense raises instead of warning


class SdpaWithScale(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


class Handwritten(torch.nn.Module):
    """softmax(form(q @ k^T, self.factor)) @ v, for one way a model writes its scale."""

    def __init__(self, form, factor):
        super().__init__()
        self.form, self.factor = form, factor

    def forward(self, q, k, v):
        scores = self.form(q @ k.transpose(-2, -1), self.factor)
        return torch.softmax(scores, dim=-1) @ v


FORMS = {  # name: (form, the scale it applies given the attribute)
    "scores * f": (lambda s, f: s * f, lambda f: f),
    "f * scores": (lambda s, f: f * s, lambda f: f),
    "scores / f": (lambda s, f: s / f, lambda f: 1 / f),
    "scores * 0.5 / f": (lambda s, f: s * 0.5 / f, lambda f: 0.5 / f),
    "scores / f * f": (lambda s, f: s / f * f, lambda f: 1.0),
}


def _qkv(batch, heads, length, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, head_dim, generator=g) for _ in range(3)]


def test_sdpa_scale_attribute_is_followed_across_calls():
    model = SdpaWithScale(0.3)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sfa", dynamic=True, options=STRICT)
    for seed, (length, scale) in enumerate([(8, 0.3), (13, 0.5), (6, 0.5), (9, 0.125)]):
        model.scale = scale
        q, k, v = _qkv(2, 3, length, 16, seed)
        want = oracle_sfa(q, k, v, TOPK, is_causal=True, scale=scale).float()
        torch.testing.assert_close(compiled(q, k, v), want, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(want, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
                                  atol=1e-3)  # SFA at topk 4 of 16 is not dense: the site was rewritten


@pytest.mark.parametrize("form", list(FORMS))
def test_handwritten_traced_scale_is_rewritten(form):
    apply, scale_of = FORMS[form]
    model = Handwritten(apply, 0.25)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sfa", dynamic=True, options=STRICT)
    for seed, (length, factor) in enumerate([(7, 0.25), (11, 0.7)]):
        model.factor = factor
        q, k, v = _qkv(2, 2, length, 8, seed)
        torch.testing.assert_close(compiled(q, k, v), oracle_sfa(q, k, v, TOPK, scale=scale_of(factor)).float(),
                                   atol=2e-5, rtol=1e-4)


SIZE_SCALES = {  # name: (attention written with a scale computed from sizes, that scale)
    "1 / sqrt(head dim)": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(k.size(-1))), -1)
                           @ v, lambda q: 1 / math.sqrt(q.size(-1))),
    "/ sqrt(length)": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-2)), -1) @ v,
                       lambda q: 1 / math.sqrt(q.size(-2))),
}


@pytest.mark.parametrize("name", list(SIZE_SCALES))
def test_scale_computed_from_symbolic_sizes_follows_them(name):
    fn, scale_of = SIZE_SCALES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="sfa", dynamic=True, options=STRICT)
    for seed, (length, head_dim) in enumerate([(8, 16), (11, 32), (5, 8)]):
        q, k, v = _qkv(2, 2, length, head_dim, seed)
        torch.testing.assert_close(compiled(q, k, v), oracle_sfa(q, k, v, TOPK, scale=scale_of(q)).float(),
                                   atol=2e-5, rtol=1e-4)


def test_symbolic_head_dim_is_rewritten_and_a_smaller_one_stays_dense():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="sfa", dynamic=True, options={"topk": TOPK})
    for seed, (length, head_dim) in enumerate([(8, 16), (5, 32), (9, 8)]):
        q, k, v = _qkv(2, 2, length, head_dim, seed)
        torch.testing.assert_close(compiled(q, k, v), oracle_sfa(q, k, v, TOPK, is_causal=True).float(),
                                   atol=2e-5, rtol=1e-4)
    q, k, v = _qkv(2, 2, 6, 3, 9)  # head dim 3 < topk: the guard recompiles, and the site stays dense
    with pytest.warns(UserWarning, match="topk 4 exceeds the head dim"):
        out = compiled(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("name, impl", CASES)
def test_every_supported_model_is_rewritten_exactly(name, impl):
    """Every supported model under dynamic=True: each site rewritten (strict), output equal to the model with each
    attention computed eagerly by flash_sfa."""
    model, inputs, _, head_dim = build(name, impl)
    model.eval()
    topk = head_dim // 4
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="sfa", dynamic=True,
                                 options={"topk": topk, "strict": True, "handoff": "aot_eager"})
        got, want = compiled(**inputs), reference_copy(model, topk)(**inputs)
    pick = (lambda out: out.logits) if hasattr(got, "logits") else (lambda out: out.last_hidden_state)
    torch.testing.assert_close(pick(got), pick(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_model_dynamic_equals_automatic(impl):
    """A Llama's float attribute ``scaling`` is traced under dynamic=True: same SFA output as the default."""
    model, inputs, _, _ = build("llama", impl)
    model.eval()
    outputs = {}
    for dynamic in (None, True):
        torch._dynamo.reset()
        with torch.no_grad():
            outputs[dynamic] = torch.compile(model, backend="sfa", dynamic=dynamic, options=STRICT)(**inputs).logits
    torch.testing.assert_close(outputs[True], outputs[None], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    with torch.no_grad():
        dense = model(**inputs).logits
    assert not torch.allclose(outputs[True], dense, atol=1e-4)


@pytest.mark.parametrize("where", ["sdpa", "handwritten"])
def test_traced_dropout_p_is_read_under_a_guard(where):
    """A dropout attribute traced as a float is specialized with a guard: changing it recompiles, so a later
    p = 0.5 applies dropout instead of reusing the 0.0 seen first."""

    class Model(torch.nn.Module):
        p = 0.0

        def forward(self, q, k, v):
            if where == "sdpa":
                return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p, scale=0.25)
            return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1), p=self.p, training=True) @ v

    model = Model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sfa", dynamic=True, options={"topk": TOPK, "handoff": "aot_eager"})
    for seed, (length, p) in enumerate([(8, 0.0), (9, 0.5), (10, 0.0)]):
        model.p = p
        q, k, v = _qkv(2, 2, length, 16, seed)
        out, want = compiled(q, k, v), oracle_sfa(q, k, v, TOPK, scale=0.25).float()
        if p == 0.0:
            torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
        else:
            assert (out - want).abs().max() > 0.1
