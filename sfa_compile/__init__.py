"""sfa-compile: turn dense-attention PyTorch models into Sparse Feature Attention (SFA) models."""

from .config import SFAConfig
from .explain import explain
from .functional import flash_sfa
from .kernels import CompressedFeatures, densify, sparsify

__version__ = "0.1.0"

__all__ = ["SFAConfig", "explain", "flash_sfa", "sparsify", "densify", "CompressedFeatures", "__version__"]
