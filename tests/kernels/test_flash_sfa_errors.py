"""Bad input: a ValueError naming the argument and what is allowed (checked before any work)."""

import pytest
import torch

from sfa_compile import flash_sfa


def qkv(q_shape=(2, 4, 5, 8), kv_shape=(2, 4, 7, 8), dtype=torch.float32):
    return torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)


@pytest.mark.parametrize("topk", [0, -1, 9, 2.0, True])
def test_topk_range(topk):
    with pytest.raises(ValueError, match=r"topk must be an integer in \[1, head dim = 8\]"):
        flash_sfa(*qkv(), topk=topk)


CASES = {
    "int dtype": (lambda: [t.long() for t in qkv()], {}, "query has dtype torch.int64; supported dtypes"),
    "mixed dtypes": (lambda: [qkv()[0], qkv()[1].double(), qkv()[2]], {}, "must share one dtype"),
    "head dim mismatch": (lambda: [qkv()[0], torch.randn(2, 4, 7, 6), torch.randn(2, 4, 7, 8)], {},
                          "same head dim"),
    "kv length mismatch": (lambda: [qkv()[0], qkv()[1], torch.randn(2, 4, 3, 8)], {}, "same length"),
    "ndim mismatch": (lambda: [qkv()[0], torch.randn(4, 7, 8), torch.randn(4, 7, 8)], {}, "same number of dims"),
    "1-d": (lambda: [torch.randn(8)] * 3, {}, "at least 2 dims"),
    "batch does not broadcast": (lambda: qkv((2, 4, 5, 8), (3, 4, 7, 8)), {}, "do not broadcast"),
    "heads without gqa": (lambda: qkv((2, 4, 5, 8), (2, 2, 7, 8)), {}, "do not broadcast"),
    "gqa heads do not divide": (lambda: qkv((2, 4, 5, 8), (2, 3, 7, 8)), {"enable_gqa": True},
                                r"key heads \(3\) must divide query heads \(4\)"),
    "gqa k/v heads differ": (lambda: [qkv()[0], torch.randn(2, 2, 7, 8), torch.randn(2, 1, 7, 8)],
                             {"enable_gqa": True}, "same number of heads"),
    "mask and causal": (qkv, {"attn_mask": torch.ones(5, 7, dtype=torch.bool), "is_causal": True}, "not both"),
    "mask int": (qkv, {"attn_mask": torch.ones(5, 7, dtype=torch.int64)}, "attn_mask must be bool, float32"),
    "mask f64 for f32 query": (qkv, {"attn_mask": torch.ones(5, 7, dtype=torch.float64)}, "attn_mask must be bool"),
    "mask does not broadcast": (qkv, {"attn_mask": torch.ones(4, 7, dtype=torch.bool)}, "does not broadcast"),
    "mask too many dims": (qkv, {"attn_mask": torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)}, "does not broadcast"),
    "dropout negative": (qkv, {"dropout_p": -0.1}, r"dropout_p must be in \[0, 1\]"),
    "dropout above one": (qkv, {"dropout_p": 1.5}, r"dropout_p must be in \[0, 1\]"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    make, kwargs, message = CASES[name]
    q, k, v = make()
    with pytest.raises(ValueError, match=message):
        flash_sfa(q, k, v, topk=2, **kwargs)


def test_mask_dtype_rule_matches_sdpa():
    """bf16 query with a float32 mask is allowed (as in SDPA)."""
    q, k, v = qkv(dtype=torch.bfloat16)
    assert flash_sfa(q, k, v, topk=2, attn_mask=torch.zeros(5, 7)).dtype == torch.bfloat16
