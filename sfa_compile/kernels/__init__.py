"""FlashSFA implementations: the custom op registration, the pure-PyTorch reference, the compressed format."""

from . import ops
from .compressed import CompressedFeatures, densify, sparsify

__all__ = ["ops", "CompressedFeatures", "densify", "sparsify"]
