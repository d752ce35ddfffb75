"""Launch planning of the decode kernels: how many splits of the cached tokens, key block, warps and stages per
shape (chosen by sweeps on the H100: benchmarks/RESULTS.md, LOG.md), and the memoized plan of one decode call
(grids, launch settings, the float32 workspace layout). The kernels' launchers live here too, so the plan can
build their launch settings."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .launcher import LaunchConfig, Launcher, cdiv, next_power_of_2
from .triton_append import decode_prologue_kernel
from .triton_decode_kernels import decode_combine_kernel, decode_split_kernel
from .triton_topk import LOW_BIT, feature_block

MIN_SPLIT_TOKENS = 128
LONG_SPLIT_TOKENS = 4096  # four-per-multiprocessor splits this long are split four times further
MERGE_COLUMNS = 32  # feature columns per merge program: more programs with fewer bytes each

# Keyed by value except the arguments that change from step to step (a growing cache's slot count and what follows
# from it: splits, their length, the mask's strides).
PROLOGUE = Launcher(decode_prologue_kernel, pointers=10, varying=("capacity",))
SPLIT = Launcher(decode_split_kernel, pointers=10, varying=(
    "scale_log2", "chunk", "n_splits", "n_parts", "n_keys", "m_start", "l_start", "stride_mask_b", "stride_mask_h",
    "stride_mask_t", "stride_mask_n"))
COMBINE = Launcher(decode_combine_kernel, pointers=3, varying=("n_splits", "n_keys", "m_start", "l_start"))


def _min_rows(block_d: int, topk: int, num_warps: int) -> int:
    """Score rows per program at least: the fewest Triton 3.6 compiles (its thread locality pass fails on 4 rows at
    head dim 16 and on 2 rows with 4 warps); 2 rows with 2 warps let a GQA-2 step rank no padding rows."""
    if block_d <= 16:
        return 8
    return 2 if num_warps == 2 and block_d <= 128 and topk <= 16 else 4


def _score_rows(rows: int, head_dim: int, topk: int, num_warps: int = 4) -> int:
    """M_REAL: the split kernel's score rows for ``rows`` = group x query length real ones."""
    return max(next_power_of_2(rows), _min_rows(feature_block(head_dim), topk, num_warps))


def _row_alignment(*strides: int) -> int:
    """The largest power of two up to 16 dividing every stride: what the split kernel may assume of the offsets
    of compressed key rows (in elements)."""
    align = 16
    while any(stride % align for stride in strides):
        align //= 2
    return align


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _programmatic_launch(device: int) -> bool:
    """Programmatic dependent launch (CUDA, Hopper and later): a kernel launches while the one before it on the
    stream finishes, and waits for it in-kernel (``gdc_wait``), hiding the launch latency between them."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_config(batch_heads: int, n_keys: int, topk: int, score_rows: int, append: bool,
                   num_splits: Optional[int], block_n: Optional[int], num_warps: Optional[int],
                   num_stages: Optional[int], device: int, interpret: bool,
                   fp8_values: bool = False) -> tuple[int, int, int, int]:
    """(splits, key block, warps, stages), each unless given; chosen by sweeps (benchmarks/RESULTS.md, LOG.md).

    With >= 16 (sequence, key head) pairs, <= 4 score rows and topk <= 16: about two programs per multiprocessor
    (long splits: fewer partial results to merge), 4 warps, 3 stages, 64-key blocks up to topk 8 and 128-key blocks
    up to topk 16. Otherwise about four programs per multiprocessor with splits of >= 128 keys: 64-key blocks,
    4 warps, 2 stages up to topk 8; 32-key blocks, 2 warps, 3 stages above; splits still >= 4096 keys long are
    split four times further, with the tiles above where swept, else 32-key blocks, 2 warps, 2 stages. When the
    split kernel ``append``s a step's new tokens, their program counts in the programs per multiprocessor (one
    more would wait for a second wave), and four programs per multiprocessor take 32-key blocks, 2 warps, 3 stages
    at every topk. FP8 values: twice those splits, 64-key blocks, 2 warps, 3 stages (the best of the sweep at
    batch 16 / 32k-128k and batch 1 / 128k, topk 8 and 16)."""
    if interpret:
        return num_splits or max(1, min(4, cdiv(n_keys, 16))), block_n or 16, num_warps or 4, num_stages or 1
    multiprocessors = _multiprocessors(device)
    measured = score_rows <= 4 and topk <= 16
    wide = (64 if topk <= 8 else 128), 4, 3
    if batch_heads >= 16 and measured:
        splits = max(1, min(2 * multiprocessors // batch_heads - append, cdiv(n_keys, MIN_SPLIT_TOKENS)))
        block, warps, stages = wide
    else:
        splits = max(1, min(cdiv(4 * multiprocessors, batch_heads) - append, cdiv(n_keys, MIN_SPLIT_TOKENS)))
        if cdiv(max(n_keys, 1), splits) >= LONG_SPLIT_TOKENS:
            splits *= 4
            block, warps, stages = wide if measured else (32, 2, 2)
        else:
            block, warps, stages = (64, 4, 2) if topk <= 8 and not append else (32, 2, 3)
    if fp8_values:
        splits, block, warps, stages = 2 * splits, 64, 2, 3
    return num_splits or splits, block_n or block, num_warps or warps, num_stages or stages


def split_config(batch_heads: int, n_keys: int, rows: int, head_dim: int, topk: int, append: bool,
                  num_splits: Optional[int], block_n: Optional[int], num_warps: Optional[int],
                  num_stages: Optional[int], device: int, interpret: bool,
                  fp8_values: bool = False) -> tuple[int, int, int, int, int]:
    """(splits, key block, warps, stages, score rows) of a split-kernel launch: ``_launch_config`` and the score
    rows its warps allow."""
    splits, block_n, num_warps, num_stages = _launch_config(batch_heads, n_keys, topk,
                                                            _score_rows(rows, head_dim, topk), append, num_splits,
                                                            block_n, num_warps, num_stages, device, interpret,
                                                            fp8_values)
    return splits, block_n, num_warps, num_stages, _score_rows(rows, head_dim, topk, num_warps)


def broadcast_strides(mask: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``mask`` expanded over its size-1 dims (0 there): what the split kernel indexes it by."""
    return tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))


class DecodePlan(NamedTuple):
    """What a decode call launches, by its shapes and settings (``decode_plan``): grids, launch settings, the split
    length, and where the partial outputs and softmax statistics sit in the one float32 workspace."""

    prologue_grid: tuple
    prologue: Optional[LaunchConfig]
    split_grid: tuple
    split: LaunchConfig
    merge_grid: tuple
    merge: LaunchConfig
    splits: int
    parts: int
    chunk: int
    m_start: int
    l_start: int
    workspace: int


@functools.lru_cache(maxsize=1024)
def decode_plan(batch: int, q_heads: int, q_len: int, head_dim: int, key_heads: int, n_keys: int, topk: int,
                dtype: torch.dtype, step: bool, presparse: bool, has_mask: bool, mask_row: bool, row_strides: tuple,
                fp8_values: bool, num_splits: Optional[int], block_n: Optional[int], num_warps: Optional[int],
                num_stages: Optional[int], device: int) -> DecodePlan:
    """The launch plan of ``decode``, memoized: a fixed cache asks the same every step, a growing one once per step
    for all layers (``device``: the current CUDA device, -1 under the interpreter; ``fp8_values``: the cached values
    are FP8 with per-row scales)."""
    interpret = SPLIT.interpret
    group = q_heads // key_heads
    rows = group * q_len
    block_d = feature_block(head_dim)
    low_bit = LOW_BIT[dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    pdl = not interpret and _programmatic_launch(device)
    append = step and not presparse  # else the prologue appends
    prologue = PROLOGUE.config(dict(BLOCK_M=max(next_power_of_2(rows), 16), BLOCK_D=block_d, LOW_BIT=low_bit,
                                     PRECISION=precision, FP8_V=fp8_values), 4, 3) if presparse else None
    splits, block_n, num_warps, num_stages, m_real = split_config(
        batch * key_heads, n_keys, rows, head_dim, topk, append, num_splits, block_n, num_warps, num_stages, device,
        interpret, fp8_values)
    parts = splits + append
    block_k = max(next_power_of_2(topk), 2)
    line = 128 // (1 if fp8_values else dtype.itemsize)  # V elements per 128-byte line (prefetched)
    split = SPLIT.config(dict(
        M_REAL=m_real, REP=max(1, 16 // m_real), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, LOW_BIT=low_bit,
        HAS_MASK=has_mask, PRESPARSE=presparse, PRECISION=precision, ROW_ALIGN=_row_alignment(*row_strides),
        EVEN_K=block_k == topk, MASK_ROW=mask_row, APPEND=append,
        PREFETCH=n_keys > 0 and not interpret and torch.version.hip is None, LINES=cdiv(block_d, line), LINE=line,
        PDL=pdl, FP8_V=fp8_values), num_warps, num_stages, pdl)
    merge_cols = min(block_d, MERGE_COLUMNS)
    merge = COMBINE.config(dict(BLOCK_S=max(next_power_of_2(parts), 2), BLOCK_D=merge_cols, ADVANCE=step, PDL=pdl),
                            4, 3, pdl)
    # The partial outputs and their softmax statistics in one allocation, passed once with the statistics' offsets
    # (three views of it cost host time every call); each part starts 64-byte aligned, so that 16 divides the
    # offsets and Triton specializes the kernels on it alike at every size.
    n_rows = batch * key_heads * parts * rows
    m_start = cdiv(n_rows * head_dim, 16) * 16
    l_start = m_start + cdiv(n_rows, 16) * 16
    return DecodePlan((batch * key_heads, 2 if step else 1), prologue, (parts, batch * key_heads), split,
                 (batch * key_heads * rows, block_d // merge_cols), merge, splits, parts,
                 cdiv(cdiv(max(n_keys, 1), splits), block_n) * block_n, m_start, l_start, l_start + n_rows)
