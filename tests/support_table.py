"""The README's tables of what the "sfa" backend rewrites and what it refuses, generated from the tests' own
data so they cannot drift: the model zoo (hf_models.CASES, each case checked by tests/passes/test_hf_models.py),
PyTorch's attention modules (tests/passes/test_multi_head_attention.py), and the refusal reasons the look-alike
suite checks, as ``explain`` words them now.

    python tests/support_table.py      # rewrites the tables in README.md (tests/test_support_table.py checks them)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import torch  # noqa: E402
from hf_models import CASES, MODELS  # noqa: E402
from lookalikes import REFUSAL_REASONS, REFUSED, qkv  # noqa: E402

import sfa_compile  # noqa: E402

README = pathlib.Path(__file__).parent.parent / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
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


def render() -> str:
    lines = [START, "", "| Hugging Face model | `attn_implementation=\"eager\"` | `\"sdpa\"` |", "|---|---|---|"]
    lines += [f"| {name} | {eager} | {sdpa} |" for name, eager, sdpa in architectures()]
    lines += ["", "| PyTorch module | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in MODULES]
    lines += ["", "| look-alike (tests/lookalikes.py) | left dense because |", "|---|---|"]
    lines += [f"| {name} | {reason} |" for name, reason in refusals()]
    return "\n".join(lines + ["", END])


def current() -> str:
    text = README.read_text()
    return text[text.index(START):text.index(END) + len(END)]


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(text.replace(current(), render()))
