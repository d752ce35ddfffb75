"""Launching the Triton prefill kernels (``triton_prefill``, ``triton_prefill_backward``): the tiles the autotuner
tries, the shared-memory filter, the mask's kind and strides, and the compile-time settings of a call."""

from __future__ import annotations

import torch
import triton

from .triton_topk import autotuning, feature_block, interpreting

NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on a GPU; the first entry is the default
# when SFA_AUTOTUNE=0 (no tuning pass on first use of a shape). The interpreter runs one small tile (it
# executes every program serially on the CPU).
FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
              (32, 32, 4, 1)]
BWD_TILES = [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 32, 4, 4),
              (32, 32, 4, 1)]
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}
_TUNING_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "PRECISION"]


_SHARED_MEMORY_BUDGET = 200 * 1024  # of the H100's 227 KiB per block; the autotuner skips tiles that fail anyway


def fitting_tiles(configs, named_args, **kwargs):
    """Tiles whose pipelined Q/K/V blocks fit shared memory at this head dim and element size."""
    width = kwargs["BLOCK_D"] + kwargs["BLOCK_DV"]
    size = named_args["Q"].element_size()

    def smem(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return size * (m * width + max(c.num_stages, 1) * n * width)

    kept = [c for c in configs if smem(c) <= _SHARED_MEMORY_BUDGET]
    return kept or [min(configs, key=smem)]


def tuned(kernel, tiles):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": fitting_tiles})(kernel)


def launch(tuned, raw, grid, *args, **meta):
    if interpreting():
        tile = dict(_INTERPRETER_TILE)
    elif not autotuning():
        config = fitting_tiles(tuned.configs, {"Q": args[0]}, **meta)[0]
        tile = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tuned[grid](*args, **meta)
        return
    raw[grid(tile)](*args, **meta, **tile)


def mask_args(mask, fallback):
    """(kind, tensor, 4 strides) for an optional 4-D mask broadcast to (batch, heads, L, S)."""
    if mask is None:
        return NO_MASK, fallback, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return BOOL_MASK, mask.view(torch.uint8), mask.stride()
    return ADDITIVE_MASK, mask, mask.stride()


def shape_meta(q, k, v, mask, is_causal):
    head_dim, value_dim = q.size(-1), v.size(-1)
    block_d, block_dv = feature_block(head_dim), feature_block(value_dim)
    return dict(
        IS_CAUSAL=is_causal, MASK_KIND=mask_args(mask, q)[0],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=(block_d == head_dim and block_dv == value_dim),
    )
