"""Hugging Face generation with SFACache: compressed keys, decode over them, same tokens as the references."""

import copy
import functools

import pytest
import torch
from hf_models import build, cache_kwarg

import sfa_compile
from sfa_compile import SFACache
from sfa_compile.integrations import hf_attention
from sfa_compile.integrations.hf_cache import SFACacheLayer


def generate(model, inputs, cache=None, n=10, **options):
    with torch.no_grad():
        return model.generate(**inputs, **cache_kwarg(model, cache), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, pad_token_id=0, **options)


def sfa_model(name, topk, calibrate=True):
    model, inputs, _, head_dim = build(name, "sdpa")
    model.eval()
    dense = copy.deepcopy(model)
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=topk or head_dim), [inputs] if calibrate else None,
                        progress=False)
    return model, dense, inputs, head_dim


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_topk_equal_head_dim_generates_the_dense_tokens(name):
    model, dense, inputs, _ = sfa_model(name, None, calibrate=False)
    want = generate(dense, inputs)
    assert torch.equal(generate(model, inputs, SFACache(model)), want)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_sparse_generation_equals_the_reference_path(name, monkeypatch):
    """topk < d with calibrated run-time projections: SFACache (compressed keys, decode op) generates what
    the same SFA model generates with a dense cache (flash_sfa over all keys at every step)."""
    model, _, inputs, head_dim = sfa_model(name, 4)
    inputs = dict(inputs)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :3] = 0  # left padding in the second sequence
    cache = SFACache(model)
    calls = []
    decode = hf_attention.flash_sfa_decode
    monkeypatch.setattr(hf_attention, "flash_sfa_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    got = generate(model, inputs, cache)
    assert len(calls) == 9 * len(cache.layers)  # every token after the prompt decoded over the compressed cache
    # Calibrated R: projected in the kernels, read from the layer's own projection (one source, no copy).
    assert all(layer.projection_weight().data_ptr() == layer.projection.weight.data_ptr() for layer in cache.layers)
    assert torch.equal(got, generate(model, inputs))
    # Bytes: topk*(s_val + s_idx) + d*s_val per token and key head, against 2*d*s_val dense (float32 here).
    tokens = got.size(1) - 1  # the last generated token is never cached
    layer = cache.layers[0].store
    per_token = layer.key_heads * (4 * (4 + 1) + head_dim * 4)
    assert cache.nbytes == len(cache.layers) * got.size(0) * tokens * per_token
    assert cache.nbytes / (len(cache.layers) * got.size(0) * tokens * layer.key_heads * 2 * head_dim * 4) == \
        pytest.approx((4 * 5 + head_dim * 4) / (2 * head_dim * 4))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_uncalibrated_identity_projection_is_dropped_from_the_cache(name):
    """Converted without calibration, R is the identity: the cache drops it (plain top-k, no projection in the
    kernels) and still generates what the reference path does with R applied."""
    model, _, inputs, _ = sfa_model(name, 4, calibrate=False)
    cache = SFACache(model)
    got = generate(model, inputs, cache)
    assert all(layer.projection_weight() is None for layer in cache.layers)
    assert torch.equal(got, generate(model, inputs))


def test_cache_refuses_models_without_sfa_attention():
    model, _, _, _ = build("llama", "sdpa")
    with pytest.raises(ValueError, match="attn_implementation='sfa'"):
        SFACache(model)
    with pytest.raises(ValueError, match="attn_implementation='sfa'"):  # not a Hugging Face model at all
        SFACache(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_cache_refuses_encoder_decoder_models_which_generate_with_their_own(name):
    import transformers

    config = (transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64) if name == "bart" else
              transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                    num_heads=2, decoder_start_token_id=0))
    cls = transformers.BartForConditionalGeneration if name == "bart" else transformers.T5ForConditionalGeneration
    model = sfa_compile.convert(cls(config).eval(), sfa_compile.SFAConfig(topk=8), progress=False)
    with pytest.raises(ValueError, match="SFACache serves decoder-only models;.*encoder-decoder"):
        SFACache(model)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)  # what it says to do
    assert out.shape[0] == 2 and out.shape[1] >= 4


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_static_cache_generates_what_the_growing_cache_does(name):
    """max_cache_len: fixed buffers, masks over the whole capacity, decode over all slots bounded by the device
    lengths; same tokens as the growing cache, with left padding."""
    model, _, inputs, _ = sfa_model(name, 4)
    inputs = dict(inputs)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :2] = 0
    length = inputs["input_ids"].size(1) + 10
    static = SFACache(model, max_cache_len=length + 3)
    got = generate(model, inputs, static)
    assert torch.equal(got, generate(model, inputs, SFACache(model)))
    store = static.layers[0].store
    assert store.fixed and store.capacity == length + 3 and store.views()[2].size(2) == length + 3
    with pytest.raises(ValueError, match="fixed capacity"):
        generate(model, inputs, SFACache(model, max_cache_len=length - 2))
    with pytest.raises(ValueError, match="max_cache_len must be a positive integer"):
        SFACache(model, max_cache_len=0)


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_prompt_is_masked_over_its_own_keys_only(padded, monkeypatch):
    """The prompt into an empty static cache attends to its own keys: no mask at all when nothing is padded (the
    fast no-mask engines run), a prompt x prompt mask with padding; same tokens as the growing cache."""
    model, _, inputs, _ = sfa_model("llama", 4)
    inputs = dict(inputs)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if padded:
        inputs["attention_mask"][0, :2] = 0
    length = inputs["input_ids"].size(1)
    seen = []
    attend = hf_attention.sfa_attention
    monkeypatch.setattr(hf_attention, "sfa_attention", lambda q, k, v, **kw: seen.append(
        (k.size(-2), kw["attn_mask"], kw["is_causal"])) or attend(q, k, v, **kw))
    cache = SFACache(model, max_cache_len=length + 8)
    # Sized by the cache itself, whatever transformers' own shortcuts for static caches (newer versions skip some).
    assert cache.layers[0].get_mask_sizes(length) == (length, 0)
    assert cache.layers[0].get_mask_sizes(torch.arange(length)) == (length, 0)  # older transformers' argument
    got = generate(model, inputs, cache, n=4)
    assert cache.layers[0].get_mask_sizes(1) == (length + 8, 0)  # decode steps: every slot
    assert len(seen) == model.config.num_hidden_layers  # the prompt; decode steps run flash_sfa_decode
    for keys, mask, causal in seen:
        assert keys == length
        if padded:
            assert mask is not None and tuple(mask.shape[-2:]) == (length, length) and not causal
        else:
            assert mask is None and causal
    assert torch.equal(got, generate(model, inputs, SFACache(model), n=4))


ON_DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


@ON_DEVICES
@pytest.mark.parametrize("max_cache_len", [None, 40])
def test_beam_search_returns_the_beams_of_the_reference_path(max_cache_len, device):
    """Beam search reorders the cached sequences after every step and num_return_sequences repeats them after the
    prompt: SFACache (growing and static) returns the beams the same SFA model returns with a dense cache."""
    model, _, inputs, _ = sfa_model("qwen3", 4)
    model.to(device)
    inputs = {name: t.to(device) for name, t in inputs.items()}
    options = dict(num_beams=3, num_return_sequences=2)
    got = generate(model, inputs, SFACache(model, max_cache_len=max_cache_len), **options)
    assert got.size(0) == 2 * inputs["input_ids"].size(0)
    assert torch.equal(got, generate(model, inputs, **options))


@ON_DEVICES
@pytest.mark.parametrize("max_cache_len", [None, 40])
def test_prompt_lookup_decoding_verifies_drafts_over_the_compressed_cache(max_cache_len, device, monkeypatch):
    """Speculative decoding (prompt lookup): a step verifies the drafted tokens at once (query length > 1 over
    the compressed cache: the decode kernel on CUDA) and the rejected ones are cropped from it; the tokens equal
    greedy decoding through the reference path."""
    model, _, _, _ = sfa_model("qwen3", 4)
    model.to(device)
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8] * 3 + [5, 6]], device=device)}  # repeats: drafts are found
    query_lengths, crops = [], []
    decode, crop = hf_attention.flash_sfa_decode, SFACacheLayer.crop
    monkeypatch.setattr(hf_attention, "flash_sfa_decode",
                        lambda query, *a, **k: query_lengths.append(query.size(2)) or decode(query, *a, **k))
    monkeypatch.setattr(SFACacheLayer, "crop", lambda layer, n: crops.append(n) or crop(layer, n))
    got = generate(model, inputs, SFACache(model, max_cache_len=max_cache_len), n=12, prompt_lookup_num_tokens=3)
    assert max(query_lengths) > 1 and min(crops) < 0
    assert torch.equal(got, generate(model, inputs, n=12))


def test_cache_layer_reaches_the_attention_function_through_either_handoff(monkeypatch):
    """Models that pass their attention kwargs through Cache.update (transformers 5.24+) get the layer as the
    keyword sfa_cache_layer, untagged keys; others (older transformers) get it on the keys. Both generate the
    reference path's tokens; a handoff lost between cache and attention fails at the next step, never silently."""
    model, _, inputs, _ = sfa_model("llama", 4)
    want = generate(model, inputs)
    layer = SFACache(model).layers[0]
    key, value = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    attention_kwargs = {}
    got_key, _ = layer.update(key, value, kwargs=attention_kwargs)
    assert attention_kwargs == {hf_attention.CACHE_LAYER_KWARG: layer}
    assert not hasattr(got_key, hf_attention.CACHE_TAG)
    got_key, _ = layer.update(key, value)
    assert getattr(got_key, hf_attention.CACHE_TAG) is layer

    update = SFACacheLayer.update
    monkeypatch.setattr(SFACacheLayer, "update", lambda self, k, v, *a, **kw: update(self, k, v, *a))
    assert torch.equal(generate(model, inputs, SFACache(model)), want)
    monkeypatch.setattr(SFACacheLayer, "update", lambda self, k, v, *a, **kw: tuple(
        t.clone() for t in update(self, k, v, *a)))  # the clone drops the tag: the keys arrive unannounced
    with pytest.raises(RuntimeError, match="never reached the 'sfa' attention function"):
        generate(model, inputs, SFACache(model))


def test_cache_crop_removes_tokens_or_keeps_a_length():
    """crop(-n) forgets the last n tokens (transformers' convention), crop(n > 0) keeps the first n (the
    convention before transformers 5.18), crop(0) does nothing; host and device lengths agree."""
    model, _, inputs, _ = sfa_model("llama", 4)
    cache = SFACache(model)
    generate(model, inputs, cache, n=4)
    length = cache.get_seq_length()
    for n, want in ((0, length), (-3, length - 3), (length, length - 3), (5, 5), (-100, 0)):
        cache.crop(n)
        store = cache.layers[0].store
        assert cache.get_seq_length() == want and store.lengths.tolist() == store.host_lengths == [want] * 2, n


@pytest.mark.gpu
@pytest.mark.parametrize("topk,value_dtype", [(None, None), (4, None), (4, torch.float8_e4m3fn)])
def test_decode_step_replayed_from_a_cuda_graph_generates_the_eager_tokens(topk, value_dtype):
    """A static SFACache makes the whole decode step capturable: benchmarks/bench_generate.py's CUDA-graph loop
    generates what eager decoding with the same cache generates."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, _, inputs, _ = sfa_model("qwen3", topk)
    model.cuda()
    prompt = inputs["input_ids"][:1].cuda()
    eager = generate(model, {"input_ids": prompt},
                     SFACache(model, max_cache_len=prompt.size(1) + 16, value_dtype=value_dtype), n=12)
    _, _, tokens = bench.graph_generate(model, SFACache(model, max_cache_len=prompt.size(1) + 16,
                                                        value_dtype=value_dtype), prompt, 12)
    assert torch.equal(tokens, eager[:, prompt.size(1):])


def decode_steps(model, step, prompt, n=6, value_dtype=None):
    """Greedy tokens: the prompt through the model, then ``n - 1`` single-token steps through ``step``; after the
    first step any recompilation raises (fail_on_recompile)."""
    cache = SFACache(model, max_cache_len=prompt.size(1) + n, value_dtype=value_dtype)
    try:
        with torch.no_grad():
            token = model(input_ids=prompt, **cache_kwarg(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
            tokens = [token]
            for i in range(n - 1):
                position = torch.tensor([prompt.size(1) + i])
                out = step(input_ids=token, **cache_kwarg(model, cache), use_cache=True, cache_position=position,
                           position_ids=position[None])
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
                if i == 0:
                    torch.compiler.set_stance("fail_on_recompile")
    finally:
        torch.compiler.set_stance("default")
    return torch.cat(tokens, 1), cache


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_compiled_decode_steps_generate_the_eager_tokens_without_recompiling(name):
    """torch.compile(fullgraph=True) of the decode step with a static SFACache: the append (a mutating custom
    op) and the decode read device state only, so one compilation serves every token (a recompilation would
    raise under the fail_on_recompile stance) and the tokens equal eager decoding. A second model with another
    topk compiles too (Dynamo then makes topk a symbolic int). A compiled call longer than the decode kernel
    takes is refused with a message naming the fix (fullgraph), or runs uncompiled."""
    torch._dynamo.reset()
    for topk in (4, None):
        model, _, inputs, _ = sfa_model(name, topk)
        prompt = inputs["input_ids"][:1]
        want, _ = decode_steps(model, model, prompt)
        got, cache = decode_steps(model, torch.compile(model.forward, fullgraph=True, backend="aot_eager"), prompt)
        assert torch.equal(got, want), topk
        assert cache.layers[0].store.host_lengths == [prompt.size(1) + 5]  # read back from the device lengths
    long_prompt = torch.randint(1, 50, (1, 17))
    with torch.no_grad():
        fresh = lambda: cache_kwarg(model, SFACache(model, max_cache_len=32))  # noqa: E731
        want = model(input_ids=long_prompt, **fresh(), use_cache=True).logits
        compiled = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match="at most 16"):
            compiled(input_ids=long_prompt, **fresh(), use_cache=True)
        # Without fullgraph, Dynamo runs the refusing cache update eagerly: the prompt is prefilled uncompiled.
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, backend="aot_eager")
        got = compiled(input_ids=long_prompt, **fresh(), use_cache=True).logits
        torch.testing.assert_close(got, want)


def forced_logits(model, cache, tokens, prompt_length):
    """Logits of every position after the prompt, feeding ``tokens`` one at a time through ``cache``."""
    with torch.no_grad():
        out = [model(input_ids=tokens[:, :prompt_length], **cache_kwarg(model, cache), use_cache=True).logits[:, -1]]
        for i in range(prompt_length, tokens.size(1)):
            out.append(model(input_ids=tokens[:, i:i + 1], **cache_kwarg(model, cache), use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fp8_values_decode_within_fp8_error_of_model_dtype_values(name):
    """SFACache(value_dtype=float8_e4m3fn): SFA layers cache values in FP8 with a float32 scale per token and key
    head; every decode step's logits stay within FP8's error of the model-dtype cache's (the same tokens fed to
    both), the bytes are what the format says, a static cache generates what the growing one does, beams run, and
    prompt lookup (drafts verified several tokens at once, rejected ones cropped) generates the greedy tokens."""
    model, _, inputs, head_dim = sfa_model(name, 4)
    tokens = generate(model, inputs, SFACache(model), n=8)
    prompt_length = inputs["input_ids"].size(1)
    fp8 = SFACache(model, value_dtype=torch.float8_e4m3fn)
    got = forced_logits(model, fp8, tokens, prompt_length)
    want = forced_logits(model, SFACache(model), tokens, prompt_length)
    store = fp8.layers[0].store
    assert store.values.dtype == torch.float8_e4m3fn and store.value_scales.dtype == torch.float32
    error = (got - want).abs().max() / want.abs().max()
    assert 0 < error < 0.03, error  # e4m3 rounds each value by up to 6%, about 2% on average
    cached = tokens.size(1)  # forced_logits fed every token
    assert fp8.nbytes == len(fp8.layers) * tokens.size(0) * cached * store.key_heads * (4 * (4 + 1) + head_dim + 4)
    static = generate(model, inputs, SFACache(model, max_cache_len=40, value_dtype=torch.float8_e4m3fn), n=8)
    assert torch.equal(static, generate(model, inputs, SFACache(model, value_dtype=torch.float8_e4m3fn), n=8))
    beams = generate(model, inputs, SFACache(model, value_dtype=torch.float8_e4m3fn), num_beams=3,
                     num_return_sequences=2)
    assert beams.size(0) == 2 * tokens.size(0)
    repeats = {"input_ids": torch.tensor([[5, 6, 7, 8] * 3 + [5, 6]])}  # drafts are found, verified and cropped
    fresh_fp8 = functools.partial(SFACache, model, value_dtype=torch.float8_e4m3fn)
    drafted = generate(model, repeats, fresh_fp8(), n=12, prompt_lookup_num_tokens=3)
    assert torch.equal(drafted, generate(model, repeats, fresh_fp8(), n=12))
    with pytest.raises(ValueError, match="value_dtype must be None"):
        SFACache(model, value_dtype=torch.float16)


def test_compiled_decode_steps_over_fp8_values_generate_the_eager_tokens():
    torch._dynamo.reset()
    model, _, inputs, _ = sfa_model("qwen3", 4)
    prompt = inputs["input_ids"][:1]
    want, _ = decode_steps(model, model, prompt, value_dtype=torch.float8_e4m3fn)
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    got, cache = decode_steps(model, compiled, prompt, value_dtype=torch.float8_e4m3fn)
    assert torch.equal(got, want) and cache.layers[0].store.value_scales is not None
