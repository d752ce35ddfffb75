"""An independent float64 SFA oracle for tests: written from DESIGN.md section 1, sharing no code with
sfa_compile. Slow and simple on purpose (rank counting for top-k, explicit GQA repeats, full masks)."""

import math

import torch


def oracle_keep(x: torch.Tensor, topk: int) -> torch.Tensor:
    """True where feature u is among the topk largest |x|, ties to the lower index (rank counting)."""
    a = x.abs()
    d = a.size(-1)
    greater = (a.unsqueeze(-2) > a.unsqueeze(-1)).sum(-1)  # [u] = #{v : |x_v| > |x_u|}
    lower = torch.ones(d, d, dtype=torch.bool, device=x.device).tril(-1)  # [u, v] = v < u
    equal_before = ((a.unsqueeze(-2) == a.unsqueeze(-1)) & lower).sum(-1)
    return (greater + equal_before) < topk


def oracle_sfa(q, k, v, topk, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, keep_q=None, keep_k=None):
    """SFA attention in float64 (autograd-capable; index sets from the values, held fixed)."""
    q, k, v = q.double(), k.double(), v.double()
    keep_q = oracle_keep(q.detach(), topk) if keep_q is None else keep_q
    keep_k = oracle_keep(k.detach(), topk) if keep_k is None else keep_k
    qs = q * keep_q
    ks = k * keep_k
    if enable_gqa and q.dim() >= 3 and q.size(-3) != k.size(-3):
        rep = q.size(-3) // k.size(-3)
        ks = ks.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    L, S = q.size(-2), k.size(-2)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.double()
    all_masked = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(all_masked, 0.0)
    return probs @ v
