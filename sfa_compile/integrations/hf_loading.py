"""Plain ``from_pretrained`` of SFA checkpoints, through transformers' public quantizer registry.

A converted model's config carries ``quantization_config = {"quant_method": "sfa"}`` beside its ``sfa``
settings. transformers then builds the registered ``SFALoader`` while loading, the one public hook that runs
after the model skeleton exists and before the weights are read: it switches the model to
``attn_implementation="sfa"`` and attaches the recorded ``SFAProjection`` modules, so their tensors load like
any other weight. Projection tensors missing from the checkpoint or of the wrong shape are errors naming the
tensor (checked before loading, and again after it: every run-time projection must be orthogonal). It removes every
trace of "quantization" from the model (SFA does not change weights' storage; ``.half()``, training and saving stay
plain), then puts the marker back into the config so that ``save_pretrained`` keeps the checkpoint loadable.
"""

from __future__ import annotations

QUANT_METHOD = "sfa"
LOADER_MARKER = {"quant_method": QUANT_METHOD}
_registered = False


def _check_projection_tensors(model, checkpoint_files) -> None:
    """Name a projection tensor that a safetensors checkpoint lacks or holds with the wrong shape, before
    transformers loads anything (its own report would only log the name)."""
    from safetensors import safe_open

    files = [f for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
    if not files:
        return
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as reader:
            shapes.update({k: reader.get_slice(k).get_shape() for k in reader.keys() if k.endswith(".sfa.weight")})
    prefix = f"{model.base_model_prefix}."
    for name, param in model.named_parameters():
        if not name.endswith(".sfa.weight"):
            continue
        stored = next((shapes[k] for k in (name, prefix + name, name.removeprefix(prefix)) if k in shapes), None)
        if stored is None:
            raise ValueError(f"SFA checkpoint: it lacks the projection tensor '{name}'")
        if tuple(stored) != tuple(param.shape):
            raise ValueError(f"SFA checkpoint: tensor '{name}' has shape {tuple(stored)}, the model expects "
                             f"{tuple(param.shape)}")


def register_loader() -> None:
    """Register the "sfa" loader with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    _registered = True

    @register_quantization_config(QUANT_METHOD)
    class SFALoaderConfig(QuantizationConfigMixin):
        """Marker config: the checkpoint is an SFA model (settings in config.sfa)."""

        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD
            self.dequantize = True  # tells transformers to drop the quantization state after loading

        def to_dict(self):
            return dict(LOADER_MARKER)

    @register_quantizer(QUANT_METHOD)
    class SFALoader(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            from ..projection import attach_projections
            from .hf_attention import ATTN_IMPLEMENTATION

            settings = getattr(model.config, "sfa", None)
            if not settings:
                raise ValueError("this checkpoint's config.json names the 'sfa' loader but has no 'sfa' settings; "
                                 "re-save it with sfa_compile.save")
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
            model.config.attn_implementation = ATTN_IMPLEMENTATION  # re-saves record it (see convert)
            attach_projections(model, settings)
            _check_projection_tensors(model, kwargs.get("checkpoint_files"))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from ..projection import check_orthogonal

            check_orthogonal(model)
            model.config.quantization_config = dict(LOADER_MARKER)
            return model

        def is_serializable(self, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True
