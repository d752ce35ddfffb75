"""Adversarial look-alikes of attention (shared by tests/passes/test_lookalikes.py and support_table.py):
code shaped like attention that is not, and for some of them the reason the backend must give."""

import math

import torch
import torch.nn.functional as F

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


# Refused as well, but not compared with eager mode under Inductor: Inductor computes a downcast followed by an
# upcast in the wider dtype (its emulate_precision_casts is off), whatever our backend does.
NARROWED = {"scores narrowed to fp16": lambda q, k, v: F.softmax((q @ kt(k)).half().float(), -1) @ v,
            "softmax in fp16": lambda q, k, v: F.softmax(q @ kt(k), -1, dtype=torch.float16).float() @ v}
REFUSED = {**LOOKALIKES, **NARROWED}

# What explain must say for some of them (a substring of the reason).
REFUSAL_REASONS = {
    "softmax over queries": "softmax over dim -2",
    "scores as their own mask": "fill two roles",
    "scores through int": "from torch.int32 to torch.float32",
    "fill -1e4": "not -inf or a dtype minimum",
    "soft-capped logits": "soft-capping",
    "negative sqrt scale": "scale is neither a finite constant nor a traced float",
    "division by zero": "division by zero",
    "implicit-dim softmax": "no dim",
    "einsum diagonal of v": "not @ v",
    "q written after the scores": "in-place op",
    "scores narrowed to fp16": "may overflow",
    "softmax in fp16": "narrows the scores",
}

