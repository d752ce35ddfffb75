"""The tables of what the "sfa" backend rewrites (README.md) and what it refuses (docs/guide.md), generated from
the tests' own data so they cannot drift: the model zoo (hf_models.CASES, each case checked by
tests/passes/test_hf_models.py), PyTorch's attention modules (tests/passes/test_multi_head_attention.py), and the
refusal reasons the look-alike suite checks, as ``explain`` words them now.

    python tests/support_table.py      # rewrites both tables (tests/test_support_table.py checks them)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import torch  # noqa: E402
from hf_models import CASES, MODELS  # noqa: E402
from lookalikes import REFUSAL_REASONS, REFUSED, qkv  # noqa: E402

import sfa_compile  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent
# (file, start marker, end marker) of each generated table.
SUPPORT = (ROOT / "README.md", "<!-- support-table:start -->", "<!-- support-table:end -->")
LOOKALIKES = (ROOT / "docs" / "guide.md", "<!-- lookalike-table:start -->", "<!-- lookalike-table:end -->")
NOT_OFFERED = "not offered by transformers"

# Checked by their own tests (tests/passes/test_hf_models.py, tests/passes/test_multi_head_attention.py).
SPECIAL = [
    ("Bloom (ALiBi via `baddbmm`, batch-dim views)", "rewritten", NOT_OFFERED),
    ("Falcon (`scores /= sqrt(d)` in place)", "rewritten", "rewritten"),
    ("Gemma2 with `attn_logit_softcapping`", "dense by design: tanh soft-capping is not plain attention",
     NOT_OFFERED),
]
MODULES = [
    ("`nn.MultiheadAttention` (batch_first or not, key_padding_mask, attn_mask, kdim/vdim), weights unused",
     "rewritten"),
    ("`nn.MultiheadAttention` with its attention weights used", "dense by design: the weights are an output"),
    ("`nn.TransformerEncoderLayer`, training path and inference fast path", "rewritten"),
    ("`nn.TransformerDecoderLayer` (self- and cross-attention, causal hint)", "rewritten"),
]


def architectures() -> list:
    offered = {(name, impl) for name, impl in CASES}
    rows = [(name, *("rewritten" if (name, impl) in offered else NOT_OFFERED for impl in ("eager", "sdpa")))
            for name in MODELS]
    return rows + SPECIAL


def refusals() -> list:
    """(look-alike, the reason explain gives now) for each look-alike whose reason the suite checks."""
    q, k, v = qkv()
    rows = []
    for name in REFUSAL_REASONS:
        torch._dynamo.reset()
        report = sfa_compile.explain(REFUSED[name], q, k, v, sfa_config=sfa_compile.SFAConfig(topk=2))
        rows.append((name, report.sites[0].reason))
    return rows


def render_support() -> str:
    start, end = SUPPORT[1:]
    lines = [start, "", "| Hugging Face model | `attn_implementation=\"eager\"` | `\"sdpa\"` |", "|---|---|---|"]
    grouped = {}  # models with the same results share a row
    for name, eager, sdpa in architectures():
        grouped.setdefault((eager, sdpa), []).append(name)
    lines += [f"| {', '.join(names)} | {eager} | {sdpa} |" for (eager, sdpa), names in grouped.items()]
    lines += ["", "| PyTorch module | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in MODULES]
    return "\n".join(lines + ["", end])


def render_lookalikes() -> str:
    start, end = LOOKALIKES[1:]
    lines = [start, "", "| look-alike (tests/lookalikes.py) | left dense because |", "|---|---|"]
    lines += [f"| {name} | {reason} |" for name, reason in refusals()]
    return "\n".join(lines + ["", end])


def current(table) -> str:
    path, start, end = table
    text = path.read_text()
    return text[text.index(start):text.index(end) + len(end)]


if __name__ == "__main__":
    for table, render in ((SUPPORT, render_support), (LOOKALIKES, render_lookalikes)):
        table[0].write_text(table[0].read_text().replace(current(table), render()))
