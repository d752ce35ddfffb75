"""sfa-compile: turn dense-attention PyTorch models into Sparse Feature Attention (SFA) models."""

from .calibrate import calibrate
from .checkpoint import load, save
from .config import SFAConfig
from .convert import convert
from .distill import attention_distillation
from .explain import explain
from .finetune import finetune
from .functional import flash_sfa
from .integrations.hf_attention import register as _register_hf
from .kernels import CompressedFeatures, densify, sparsify

__version__ = "0.1.0"

__all__ = ["CompressedFeatures", "SFAConfig", "__version__", "attention_distillation", "calibrate", "convert",
           "densify", "explain", "finetune", "flash_sfa", "load", "save", "sparsify"]

_register_hf()  # attn_implementation="sfa" works in transformers once sfa_compile is imported
