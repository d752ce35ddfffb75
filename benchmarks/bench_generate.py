"""End-to-end generation: a Qwen3-0.6B-shaped model (random weights, built from a config) after a long
prompt, dense SDPA vs SFA with the compressed key cache, on one GPU.

Per setting: prefill the prompt (timed; a short generation first compiles every kernel it runs), then greedy-decode
``--new-tokens`` tokens one forward at a time (timed; tokens/s = batch * new tokens / decode time). Dense runs
Hugging Face's DynamicCache and StaticCache with attn_implementation="sdpa"; SFA runs the converted model (run-time
projections, RoPE) with SFACache.
CUDA-graph rows: the same model with a static cache (StaticCache / SFACache(max_cache_len=...)), prompt eager, every
decode step after two eager ones replayed from one captured graph (graph_generate); "vs dense" compares them with
the faster dense CUDA-graph row: transformers' "sdpa" (which repeats K/V to every query head when a mask is given)
or the same SDPA with enable_gqa. With --compile, also rows whose decode step is torch.compile'd (Inductor,
fullgraph) before capture: dense SDPA with enable_gqa + StaticCache and SFA + static SFACache, compared with each
other. SFA rows convert without calibration (R = identity, which SFACache drops: plain top-k, the paper's method);
with --compile each topk also gets a row with a random orthogonal R per layer and key head ("+ R": the run-time
cost of a calibrated conversion). Every graph row is checked against the same steps run without the graph.
Cache bytes: the tokens cached at the end (SFACache.nbytes vs K + V of the dense cache) against the formula
(k*(s_val+s_idx) + d*s_val) / (2*d*s_val). With --fp8-values each topk also gets graph rows with
SFACache(value_dtype=torch.float8_e4m3fn), and a line comparing FP8 with bf16 values on the same tokens
(teacher-forced after the prompt: how often the greedy pick agrees, mean KL of the next-token distributions) and
how many leading tokens the two free-running generations share.

    python benchmarks/bench_generate.py [--prompt 32768] [--new-tokens 128] [--batch 1] [--topks 8 16]
                                        [--compile] [--fp8-values] [--skip-eager] [--out DIR] [--publish]
"""

import argparse
import copy
import functools
import inspect
import time

import torch
import torch.nn.functional as F
import transformers
from publish import Report, add_arguments, provenance
from transformers import DynamicCache, StaticCache

import sfa_compile
from sfa_compile import SFACache


def qwen3_06b(vocab: int):
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=1_000_000,
        tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def random_rotations(model, seed=0) -> None:
    """A random orthogonal R per SFA layer and key head: what a calibrated conversion costs at run time (the
    uncalibrated identity R is dropped by SFACache: plain top-k)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        projection = getattr(module, "sfa", None)
        if projection is not None and projection.weight is not None:
            r = torch.linalg.qr(torch.randn(projection.weight.shape, generator=g, dtype=torch.float64))[0]
            projection.weight.data.copy_(r.to(projection.weight))


def cache_kwarg(model, cache) -> dict:
    """``cache`` as the keyword argument ``model``'s forward takes: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there, to be removed in 5.40), ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def timed_prefill(model, cache, prompt, **kwargs):
    """Run the prompt into ``cache``; returns (seconds, greedy first token)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(input_ids=prompt, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1, **kwargs)
    token = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return time.perf_counter() - start, token


@torch.no_grad()
def generate(model, cache, prompt, new_tokens):
    prefill, token = timed_prefill(model, cache, prompt)
    generated = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    torch.cuda.synchronize()
    decode = time.perf_counter() - start
    return prefill, prompt.size(0) * (new_tokens - 1) / decode, torch.cat(generated, 1)


@torch.no_grad()
def graph_generate(model, cache, prompt, new_tokens, warmup=2, forward=None):
    """Like ``generate`` with a static cache, but every decode step after ``warmup`` eager ones replays one CUDA
    graph: the step (mask update, forward, greedy pick, position advance) reads and writes device buffers only.
    ``forward``: what runs the decode steps (default the model; e.g. a torch.compile'd ``model.forward``, which
    compiles in the warm-up steps); the prompt always runs through the model. Decode tokens/s counts the
    replayed steps. Returns (prefill s, decode tokens/s, tokens)."""
    forward = forward or model
    batch, length = prompt.shape
    capacity = cache.layers[0].max_cache_len
    device = prompt.device
    mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)  # 4-D: used as is by transformers
    mask[..., :length] = True
    prefill, token = timed_prefill(model, cache, prompt, cache_position=torch.arange(length, device=device))
    tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)
    tokens[:, :1] = token
    position = torch.tensor([length], device=device)

    def step():
        mask.index_fill_(-1, position, True)
        out = forward(input_ids=token, **cache_kwarg(model, cache), use_cache=True, cache_position=position,
                      position_ids=position.expand(batch, 1), attention_mask=mask)
        token.copy_(out.logits[:, -1:].argmax(-1))
        tokens.index_copy_(1, position - length + 1, token)
        position.add_(1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replays = new_tokens - 1 - warmup
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return prefill, batch * replays / (time.perf_counter() - start), tokens


@torch.no_grad()
def forced_logits(model, cache, prompt, tokens):
    """Float32 next-token logits after the prompt and after each of ``tokens`` but the last, fed one at a time."""
    logits = [model(input_ids=prompt, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]]
    for i in range(tokens.size(1) - 1):
        logits.append(model(input_ids=tokens[:, i:i + 1], **cache_kwarg(model, cache), use_cache=True).logits[:, -1])
    return torch.stack(logits, 1).float()


def fp8_agreement(model, prompt, tokens, fp8_tokens) -> str:
    """FP8 against bf16 values: on the same ``tokens`` (greedy agreement, mean KL(bf16 || FP8)), and the leading
    tokens the free-running generations share."""
    want = forced_logits(model, SFACache(model), prompt, tokens)
    got = forced_logits(model, SFACache(model, value_dtype=torch.float8_e4m3fn), prompt, tokens)
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    return (f"FP8 vs bf16 values over {tokens.size(1)} steps: greedy picks agree at {100 * agree:.1f}% (same "
            f"tokens fed), mean KL(bf16 || FP8) {kl:.2e}; free-running, the first {leading_equal(tokens, fp8_tokens)}"
            " tokens are equal")


def sdpa_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                       **kwargs):
    """Dense SDPA that keeps GQA inside the kernel (enable_gqa) also with a mask; transformers' "sdpa" repeats
    K and V to all query heads whenever a mask is given, which a static cache always needs."""
    mask = None if attention_mask is None else attention_mask[..., :key.size(-2)]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=mask is None and query.size(2) > 1,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def leading_equal(a, b) -> int:
    """How many leading generated tokens two runs share (all sequences)."""
    return (a == b).all(0).long().cumprod(0).sum().item()


def replay_check(model, make_cache, prompt, new_tokens, tokens, forward=None) -> str:
    """The CUDA-graph tokens against the same steps run without the graph (all but the last step before capture)."""
    _, _, eager = graph_generate(model, make_cache(), prompt, new_tokens, warmup=new_tokens - 2, forward=forward)
    return f"first {leading_equal(tokens, eager)}/{new_tokens} tokens equal the same steps run eagerly"


def dense_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def row(attention, cache, prefill, tps) -> dict:
    return dict(attention=attention, cache=cache, prefill_s=round(prefill, 3), tokens_per_s=round(tps, 1))


def plot_generate(figure, rows) -> None:
    """Decode tokens/s per row, one bar each."""
    axes = figure.add_subplot(1, 1, 1)
    labels = [f"{r['attention']} | {r['cache']}" for r in rows]
    axes.barh(range(len(rows)), [r["tokens_per_s"] for r in rows])
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("decode tokens/s (higher is better)")
    axes.set_title("end-to-end greedy generation", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)


def graph_row(report, label, cache_label, model, make_cache, prompt, new_tokens, baseline, forward=None):
    """One CUDA-graph row: time, check against the same steps without the graph, report; returns (tokens/s,
    tokens)."""
    prefill, tps, tokens = graph_generate(model, make_cache(), prompt, new_tokens, forward=forward)
    check = replay_check(model, make_cache, prompt, new_tokens, tokens, forward=forward)
    ratio = f"{tps / baseline:.2f}x" if baseline else "1.00x"
    report.row(row(label, cache_label, prefill, tps),
               f"| {label} | {cache_label} | {prefill:.2f} | {tps:.1f} | {ratio} | | | {check} |")
    torch.cuda.empty_cache()
    return tps, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--topks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--compile", action="store_true",
                        help="also rows whose decode step is torch.compile'd (Inductor) and replayed from a CUDA graph")
    parser.add_argument("--fp8-values", action="store_true",
                        help="also CUDA-graph rows with FP8 values in SFACache, and their agreement with bf16 values")
    parser.add_argument("--skip-eager", action="store_true", help="only the CUDA-graph rows")
    add_arguments(parser)
    args = parser.parse_args()
    model = qwen3_06b(args.vocab)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), device="cuda")
    capacity = args.prompt + args.new_tokens
    report = Report("bench_generate", "End-to-end generation (benchmarks/bench_generate.py)", args)
    report.line(f"{provenance(torch.cuda.get_device_name())}; Qwen3-0.6B shape (random weights, bf16), batch "
                f"{args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, greedy")
    report.line()
    report.line("| attention | cache | prefill s | decode tokens/s | vs dense (best cache) | cache bytes vs dense | "
                "formula | tokens |")
    report.line("|---|---|---|---|---|---|---|---|")
    generate(model, DynamicCache(config=model.config), prompt[:, :1024], 4)  # warm up kernels
    rows = {}
    if not args.skip_eager:
        for name, make in (("DynamicCache", lambda: DynamicCache(config=model.config)),
                           ("StaticCache", lambda: StaticCache(model.config, max_cache_len=capacity))):
            cache = make()
            prefill, tps, _ = generate(model, cache, prompt, args.new_tokens)
            rows[name] = tps
            if name == "DynamicCache":
                dense_cache_bytes = dense_bytes(cache)
            report.row(row("dense SDPA", name, prefill, tps), f"| dense SDPA | {name} | {prefill:.2f} | {tps:.1f} "
                                                              "| 1.00x | 1.000 | | |")
            del cache
            torch.cuda.empty_cache()
    static_dense = functools.partial(StaticCache, model.config, max_cache_len=capacity)
    transformers.AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
    transformers.AttentionMaskInterface.register("sdpa_gqa", transformers.masking_utils.sdpa_mask)
    graph_rows, notes = {}, []
    for implementation in ("sdpa", "sdpa_gqa"):
        model.set_attn_implementation(implementation)
        label = "dense SDPA" if implementation == "sdpa" else "dense SDPA, enable_gqa (no K/V repeat)"
        graph_rows[implementation] = graph_row(report, label, "StaticCache + CUDA graph", model, static_dense, prompt,
                                               args.new_tokens, graph_rows.get("sdpa"))[0]
    graph_dense = max(graph_rows.values())
    compiled_dense = None
    if args.compile:  # model is on "sdpa_gqa" here
        compiled_dense = graph_row(report, "dense SDPA, enable_gqa", "StaticCache + torch.compile + CUDA graph", model,
                                   static_dense, prompt, args.new_tokens, None,
                                   forward=torch.compile(model.forward, fullgraph=True))[0]
    model.set_attn_implementation("sdpa")
    for topk in args.topks:
        sfa = sfa_compile.convert(copy.deepcopy(model), sfa_compile.SFAConfig(topk=topk), progress=False)
        static_sfa = functools.partial(SFACache, sfa, max_cache_len=capacity)
        generate(sfa, SFACache(sfa), prompt[:, :1024], 4)  # compile the SFA kernels outside the timed prefill
        if not args.skip_eager:
            cache = SFACache(sfa)
            prefill, tps, eager_tokens = generate(sfa, cache, prompt, args.new_tokens)
            formula = (topk * (2 + 1) + 128 * 2) / (2 * 128 * 2)
            report.row(row(f"SFA topk {topk}", "SFACache", prefill, tps),
                       f"| SFA topk {topk} | SFACache | {prefill:.2f} | {tps:.1f} | {tps / max(rows.values()):.2f}x | "
                       f"{cache.nbytes / dense_cache_bytes:.4f} | {formula:.4f} | |")
            del cache
            torch.cuda.empty_cache()
            prefill, tps, static_tokens = generate(sfa, static_sfa(), prompt, args.new_tokens)
            report.row(row(f"SFA topk {topk}", "SFACache static", prefill, tps),
                       f"| SFA topk {topk} | SFACache static | {prefill:.2f} | {tps:.1f} "
                       f"| {tps / max(rows.values()):.2f}x | | | first {leading_equal(static_tokens, eager_tokens)}/"
                       f"{args.new_tokens} tokens equal the growing cache's |")
            torch.cuda.empty_cache()
        _, tokens = graph_row(report, f"SFA topk {topk}", "SFACache static + CUDA graph", sfa, static_sfa, prompt,
                              args.new_tokens, graph_dense)
        if args.compile:
            graph_row(report, f"SFA topk {topk}", "SFACache static + torch.compile + CUDA graph", sfa, static_sfa,
                      prompt, args.new_tokens, compiled_dense, forward=torch.compile(sfa.forward, fullgraph=True))
        if args.fp8_values:
            static_fp8 = functools.partial(static_sfa, value_dtype=torch.float8_e4m3fn)
            label = f"SFA topk {topk}, FP8 values"
            _, fp8_tokens = graph_row(report, label, "SFACache static + CUDA graph", sfa, static_fp8, prompt,
                                      args.new_tokens, graph_dense)
            if args.compile:
                graph_row(report, label, "SFACache static + torch.compile + CUDA graph", sfa, static_fp8, prompt,
                          args.new_tokens, compiled_dense, forward=torch.compile(sfa.forward, fullgraph=True))
            agreement = fp8_agreement(sfa, prompt, tokens, fp8_tokens)
            torch.cuda.empty_cache()
        if args.compile:  # the run-time cost of a calibrated conversion's projection
            random_rotations(sfa)
            generate(sfa, SFACache(sfa), prompt[:, :1024], 4)  # the kernels' projection variants
            graph_row(report, f"SFA topk {topk} + R", "SFACache static + torch.compile + CUDA graph", sfa,
                      static_sfa, prompt, args.new_tokens, compiled_dense,
                      forward=torch.compile(sfa.forward, fullgraph=True))
        del sfa
        torch.cuda.empty_cache()
        if args.fp8_values:
            notes.append(f"topk {topk}: {agreement}")
    if notes:
        report.line()
    for note in notes:
        report.line(f"- {note}")
    report.finish(plot=plot_generate)


if __name__ == "__main__":
    main()
