"""What the Triton kernels take and the constants they share, in one place: the op's dispatch, the argument
checks and the kernels all read these."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 runs on the reference
HALF_DTYPES = (torch.float16, torch.bfloat16)  # SDPA's fused GPU backends
MAX_HEAD_DIM = 256  # prefill and decode kernels hold a row of features in registers
MAX_QUERY_LENGTH = 16  # query tokens per decode call (speculative decoding fits)
MAX_FUSED_PROJECTION_DIM = 128  # above this, R is a torch matmul before the decode kernels (its tile would spill)
MAX_UINT8_INDEX_DIM = 256  # compressed key indices are uint8 up to this head dim, int16 above
LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2
LN2 = 0.6931471805599453  # and converts its log-sum-exp back to natural log
FP8_VALUE_DTYPE = torch.float8_e4m3fn  # the compressed cache's optional FP8 values (``value_dtype``)
FP8_VALUE_MAX = 448.0  # e4m3fn's largest finite value: each cached value row is scaled so its largest magnitude is this
