import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels under test run on the CPU through Triton's interpreter (DESIGN.md section 5). Set before
    # any kernel module is imported: @triton.jit reads it when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
