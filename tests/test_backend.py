"""The "sfa" torch.compile backend as users meet it: entry point, options, layer filter, training, recompiles."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from hf_models import build, reference_copy
from torch._inductor.custom_graph_pass import CustomGraphPass

import sfa_compile
from sfa_compile.backend import parse_options


def test_entry_point_declared():
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "sfa"]
    assert len(eps) == 1 and eps[0].value == "sfa_compile.backend:sfa_backend"


def test_backend_by_name_without_import():
    script = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
        fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                           backend="sfa", options={"topk": 8, "handoff": "eager"}, fullgraph=True)
        out = fn(q, k, v)
        assert "sfa_compile" in sys.modules
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_unknown_option_lists_valid_ones():
    valid = r"\['handoff', 'layers', 'mode', 'strict', 'topk'\], or an Inductor setting"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topK'\]; valid options: " + valid):
        parse_options({"topK": 8})
    with pytest.raises(ValueError, match="handoff must be one of"):
        parse_options({"handoff": "tensorrt"})
    with pytest.raises(ValueError, match="topk must be an integer"):
        parse_options({"topk": 0})
    with pytest.raises(ValueError, match=r"mode must be one of \[.*'reduce-overhead'.*\], got 'fast'"):
        parse_options({"mode": "fast"})
    with pytest.raises(ValueError, match="Inductor option 'max_autotune' takes a bool, got 'yes'"):
        parse_options({"max_autotune": "yes"})
    with pytest.raises(ValueError, match="mode and Inductor options need handoff='inductor'"):
        parse_options({"handoff": "eager", "max_autotune": True})


class _SeesInductorConfig(CustomGraphPass):
    """A user's joint-graph pass: records the Inductor settings in force and the graph's targets when it runs."""

    def __init__(self):
        self.seen = []

    def __call__(self, graph):
        config = torch._inductor.config
        self.seen.append((config.max_autotune, config.triton.cudagraphs, {str(n.target) for n in graph.nodes}))

    def uuid(self):
        return None  # never cached: each test compiles afresh


@pytest.mark.parametrize("how", ["mode argument", "mode option", "inductor options", "joint pass in options"])
def test_inductor_mode_and_options_reach_inductor(how):
    """torch.compile's mode (it refuses mode with options) or the options' mode and Inductor settings configure
    Inductor for this call, beside SFA's own options and joint-pass patches; a user's joint pass still runs."""
    q, k, v = (torch.randn(1, 2, 6, 32, requires_grad=True) for _ in range(3))  # head dim above the default topk
    fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    seen = _SeesInductorConfig()
    torch._dynamo.reset()
    with torch._inductor.config.patch(joint_custom_post_pass=seen):
        if how == "mode argument":
            compiled = torch.compile(fn, backend="sfa", mode="max-autotune-no-cudagraphs")
        elif how == "mode option":
            compiled = torch.compile(fn, backend="sfa", options={"topk": 4, "mode": "max-autotune-no-cudagraphs"})
        elif how == "inductor options":
            compiled = torch.compile(fn, backend="sfa", options={"topk": 4, "max_autotune": True})
        else:  # the user's pass given for this call only, in place of the configured one
            seen = _SeesInductorConfig()
            compiled = torch.compile(fn, backend="sfa", options={"topk": 4, "max_autotune": True,
                                                                 "joint_custom_post_pass": seen})
        out = compiled(q, k, v)
    topk = 4 if how != "mode argument" else sfa_compile.SFAConfig().topk
    torch.testing.assert_close(out, sfa_compile.flash_sfa(q, k, v, topk=topk, is_causal=True))
    assert seen.seen and all(autotune and not graphs for autotune, graphs, _ in seen.seen)
    assert any("sfa.flash_sfa.default" in targets for _, _, targets in seen.seen)


def test_layer_filter_keeps_other_layers_dense():
    model, inputs, _, head_dim = build("gpt2", "eager")
    report = sfa_compile.explain(model.eval(), **inputs, sfa_config=sfa_compile.SFAConfig(topk=4, layers=r"\.h\.0\."))
    assert [(s.module_path, s.rewritten) for s in report.sites] == [("transformer.h.0.attn", True),
                                                                      ("transformer.h.1.attn", False)]
    assert "not selected by layers" in report.sites[1].reason
    assert "transformer.h.1.attn" in report.table() and "1 of 2 attention sites rewritten" in report.table()


def test_topk_above_head_dim_is_refused_with_reason():
    model, inputs, _, head_dim = build("llama", "sdpa")
    report = sfa_compile.explain(model.eval(), **inputs, sfa_config=sfa_compile.SFAConfig(topk=head_dim + 1))
    assert all(not s.rewritten and "exceeds the head dim" in s.reason for s in report.sites)


def test_training_through_inductor_matches_reference():
    model, inputs, _, head_dim = build("llama", "eager")
    model.train()
    ref = reference_copy(model, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sfa", options={"topk": 4})
    labels = inputs["input_ids"]
    compiled(**inputs, labels=labels).loss.backward()
    ref(**inputs, labels=labels).loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def _count_compiles(backend, options=None):
    model, _, _, _ = build("gpt2", "sdpa")
    model.eval()
    calls = []
    torch._dynamo.reset()

    def counting(gm, example_inputs):
        calls.append(1)
        if backend == "sfa":
            return sfa_compile.backend.sfa_backend(gm, example_inputs, options=options)
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(model, backend=counting, dynamic=True)
    with torch.no_grad():
        for length in (5, 7, 11, 13):
            compiled(input_ids=torch.randint(0, 100, (2, length)))
    return len(calls)


def test_sequence_length_changes_do_not_recompile_more_than_inductor():
    sfa = _count_compiles("sfa", {"topk": 4})
    plain = _count_compiles("inductor")
    assert sfa <= plain, (sfa, plain)


def _refused_site(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


def test_sites_left_dense_warn_once_per_compile_and_strict_raises():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"1 attention site\(s\) stay dense: <root> \(softmax over dim -2"):
        torch.compile(_refused_site, backend="sfa", options={"topk": 4, "handoff": "eager"})(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"stay dense \(strict=True\): <root> \(softmax over dim -2"):
        torch.compile(_refused_site, backend="sfa", options={"topk": 4, "strict": True, "handoff": "eager"})(q, k, v)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="topk 8 equals the head dim"):
        torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), backend="sfa",
                      options={"topk": 8, "handoff": "eager"})(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"mode": "reduce-overhead"}, "dynamic"])
def test_modes_on_the_gpu_compute_what_the_default_does(options):
    """CUDA graphs around sfa::flash_sfa (reduce-overhead), and dynamic=True, on a bf16 Llama: the same logits as
    the default compile, over repeated and changing sequence lengths (the same kernels run, so top-k ties fall
    alike; autotuned matmuls round differently and are left out)."""
    model, _, _, _ = build("llama", "sdpa")
    model = model.eval().cuda().to(torch.bfloat16)
    lengths = (16, 16, 16, 24)
    ids = [torch.randint(0, 100, (2, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
           for n in lengths]

    def run(**kw):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sfa", **kw)
        with torch.no_grad():
            return [compiled(input_ids=x).logits.float().clone() for x in ids]

    want = run(options={"topk": 4})
    got = run(options={"topk": 4}, dynamic=True) if options == "dynamic" else run(options={"topk": 4, **options})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
