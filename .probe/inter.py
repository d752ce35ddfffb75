import torch, triton
from sfa_compile.kernels import triton_decode
from sfa_compile.kernels.kv_cache import CompressedKVCache
def bench(fn): return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
torch.manual_seed(0)
variants = {"default": {}, "s16b32w2st2": dict(num_splits=16, block_n=32, num_warps=2, num_stages=2),
            "s16b32w4st3": dict(num_splits=16, block_n=32, num_warps=4, num_stages=3),
            "s10b32w2st3": dict(num_splits=10, block_n=32, num_warps=2, num_stages=3),
            "s32b32w2st2": dict(num_splits=32, block_n=32, num_warps=2, num_stages=2)}
for B, N, topk in [(16, 32768, 8), (16, 131072, 8), (16, 32768, 16), (16, 131072, 16), (1, 131072, 8)]:
    d = 128
    k = torch.randn(B, 8, N, d, dtype=torch.bfloat16, device="cuda"); v = torch.randn_like(k)
    cache = CompressedKVCache(B, 8, d, topk, torch.bfloat16, "cuda", capacity=N); cache.append(k, v)
    q = torch.randn(B, 32, 1, d, dtype=torch.bfloat16, device="cuda")
    kv, ki, vv = cache.views()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cud = [bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)) for _ in range(3)]
    ref = triton_decode.decode(q, kv, ki, vv, cache.lengths, topk, d ** -0.5, None)
    res = {n: [] for n in variants}
    for r in range(5):
        for n, kw in variants.items():
            fn = lambda: triton_decode.decode(q, kv, ki, vv, cache.lengths, topk, d ** -0.5, None, **kw)
            assert (fn().float() - ref.float()).abs().max().item() < 1e-2
            res[n].append(bench(fn))
    cmed = sorted(cud)[1]
    print(f"B{B} N{N} topk{topk} cudnn {cmed*1000:.0f}us | " + " | ".join(f"{n} {sorted(t)[2]*1000:.0f}us {cmed/sorted(t)[2]:.2f}x" for n, t in res.items()), flush=True)
    del k, v, cache
