"""sfa-compile: turn dense-attention PyTorch models into Sparse Feature Attention (SFA) models."""

from .config import SFAConfig
from .conversion.calibrate import calibrate
from .conversion.checkpoint import load, save
from .conversion.convert import convert
from .explain import explain
from .exporters.onnx_export import export_onnx
from .exporters.ort_plugin import ort_session
from .functional import flash_sfa, flash_sfa_decode
from .integrations import register as _register_hf
from .kernels import CompressedFeatures, densify, sparsify
from .kernels.kv_cache import CompressedKVCache
from .projection import projection_parameters
from .training.distill import attention_distillation
from .training.finetune import finetune

__version__ = "0.1.0"

__all__ = ["CompressedFeatures", "CompressedKVCache", "SFAConfig", "__version__", "attention_distillation",
           "calibrate", "convert", "densify", "explain", "export_onnx", "finetune", "flash_sfa", "flash_sfa_decode",
           "load", "ort_session", "projection_parameters", "save", "sparsify"]

if _register_hf():  # attn_implementation="sfa" works in transformers once sfa_compile is imported
    from .integrations.hf_cache import SFACache as SFACache

    __all__.append("SFACache")
