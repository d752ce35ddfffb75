"""Integrations with Hugging Face transformers, registered in one place: the "sfa" attention and mask functions
and the checkpoint loader."""

from __future__ import annotations


def is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def register() -> bool:
    """Register "sfa" with transformers (attention and mask function, checkpoint loader; idempotent); False when
    transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    from .hf_attention import register_attention
    from .hf_loading import register_loader

    register_attention()
    register_loader()
    return True
