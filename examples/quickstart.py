"""Quickstart: SFA as a drop-in for scaled_dot_product_attention, and the compressed key format."""

import torch
import torch.nn.functional as F

from sfa_compile import flash_sfa, sparsify

torch.manual_seed(0)
q, k, v = torch.randn(1, 8, 256, 64), torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
# Random q and k spread their energy evenly over all features, the hardest case for top-k; a trained model's
# concentrate it, and conversion's calibration rotates more of it into the kept features.
print("SFA vs dense attention on random q, k (the hardest case for top-k; `sfa-compile demo` shows a real model):")
for topk in (8, 16, 32, 64):
    out = flash_sfa(q, k, v, topk=topk, is_causal=True, enable_gqa=True)
    cos = F.cosine_similarity(out.flatten(0, -2), dense.flatten(0, -2), dim=-1).mean()
    note = "  (topk = head dim: dense attention, exactly)" if topk == q.size(-1) else ""
    print(f"  topk={topk:3d}  cosine to dense = {cos:.4f}{note}")

keys = sparsify(k.to(torch.bfloat16), 16)
print(f"compressed keys: {keys.nbytes} bytes vs {k.to(torch.bfloat16).nbytes} dense "
      f"(values {keys.values.dtype}, indices {keys.indices.dtype})")
