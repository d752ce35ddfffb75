"""``convert``: turn a Hugging Face model into an SFA model in place (plain nn.Modules: module_conversion.py).

Attention layers are found exactly, not by name: one forward pass through the "sfa" attention function
records every layer that calls it (with the head counts and head dim it sees). Layers whose module path
matches ``SFAConfig.layers`` get an ``SFAProjection`` (``module.sfa``); calibration then fits R. For models
without rotary embeddings whose query/key projections have a known layout (separate Linear layers, or
GPT-2's fused Conv1D), R is folded into the weights and the run-time projection disappears.

The SFA settings are recorded in ``model.config.sfa`` so that checkpoints carry them, and the config names the
"sfa" loader so that a plain ``from_pretrained`` restores the model (integrations/hf_loading.py).
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch

from ..config import SFAConfig
from ..integrations import is_hf_model, register
from ..integrations.hf_attention import ATTN_IMPLEMENTATION
from ..integrations.hf_loading import LOADER_MARKER
from ..passes.pipeline import left_dense, warn_or_raise
from ..projection import SFAProjection, fold_into_linear
from ..training.model_call import call_model, check_examples, trains
from ..training.observers import observe
from .calibrate import REFINE_STEPS, calibrate
from .modules import InputSpec, rewrite_module, settings


def attention_layers(model, example) -> dict[str, tuple[int, int, int]]:
    """{module path: (query heads, key heads, head dim)} of every layer calling the attention function."""
    names = {id(m): name for name, m in model.named_modules()}
    found: dict[str, tuple[int, int, int]] = {}

    def record(module, query, key, value, attention_mask, output, sdpa_kwargs):
        found.setdefault(names[id(module)], (query.size(1), key.size(1), query.size(-1)))

    was_training = model.training
    model.eval()
    with torch.no_grad(), observe(model, record):
        call_model(model, example)
    model.train(was_training)
    return found


def uses_rope(model) -> bool:
    cfg = model.config
    if getattr(cfg, "position_embedding_type", None) in ("rotary", "rope"):
        return True
    return any(getattr(cfg, name, None) is not None for name in ("rope_theta", "rope_parameters", "rope_scaling",
                                                                 "rotary_dim", "rotary_emb_base"))


def _own_config(model) -> None:
    """Give ``model`` its own copy of its config (and sub-configs), re-pointing every module that held the
    originals: conversion changes the config, and other models built from the same object must not change."""
    copies: dict = {}
    model.config = copy.deepcopy(model.config, copies)
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in copies:
            module.config = copies[id(config)]


def _foldable_projections(module, sfa: SFAProjection, heads: int):
    """("linear", q, k) or ("conv1d", c_attn) when the layer's query/key projections have a known layout
    (heads contiguous in the output features), else None."""
    d = sfa.head_dim
    for a, b in (("query", "key"), ("q_proj", "k_proj")):
        q_lin, k_lin = getattr(module, a, None), getattr(module, b, None)
        if isinstance(q_lin, torch.nn.Linear) and isinstance(k_lin, torch.nn.Linear):
            if q_lin.out_features == heads * d and k_lin.out_features == sfa.key_heads * d:
                return "linear", q_lin, k_lin
            return None
    c_attn = getattr(module, "c_attn", None)  # GPT-2: Conv1D weight (in, 3 * embed) = [q | k | v]
    if c_attn is not None and type(c_attn).__name__ == "Conv1D" and sfa.key_heads == heads:
        if c_attn.weight.size(1) == 3 * heads * d and c_attn.bias is not None:
            return "conv1d", c_attn
    return None


def _fold(layout, sfa: SFAProjection, heads: int) -> None:
    r, d = sfa.weight.detach(), sfa.head_dim
    if layout[0] == "linear":
        for lin, h in ((layout[1], heads), (layout[2], sfa.key_heads)):
            w, b = fold_into_linear(lin.weight.data, None if lin.bias is None else lin.bias.data, r, h, d)
            lin.weight.data.copy_(w)
            if b is not None:
                lin.bias.data.copy_(b)
        return
    c_attn, embed = layout[1], heads * d
    for part in (0, 1):
        cols = slice(part * embed, (part + 1) * embed)
        w, b = fold_into_linear(c_attn.weight.data[:, cols], c_attn.bias.data[cols], r, heads, d, transposed=True)
        c_attn.weight.data[:, cols] = w
        c_attn.bias.data[cols] = b


@trains  # projections made under a caller's inference mode could not be trained
def convert(model, config: Optional[SFAConfig] = None, calibration: Optional[Iterable] = None, *,
            refine_steps: int = REFINE_STEPS, fold: bool = True, example=None, progress: bool = True):
    """Make ``model`` an SFA model and return it.

    Hugging Face models are converted in place and switch to ``attn_implementation="sfa"``; a conversion that
    fails or is interrupted leaves them as they were. Other nn.Modules are
    traced with torch.fx and rewritten by the backend's passes; the result is a new ``torch.fx.GraphModule``
    sharing the model's parameters (module_conversion.py), traced from ``example`` (default: the first
    calibration input), whose tensor arguments become its inputs.

    ``calibration``: optional iterable of example inputs (mappings of keyword arguments such as a tokenizer's output,
    tuples, or tensors) used to fit the projections R: principal axes, then ``refine_steps`` steps per layer of
    layer-local Eq. 8 training (calibrate.py; 0 skips it); without it R is the identity (plain top-k). ``fold``
    folds R into the weights of Hugging Face models without rotary embeddings and with a known projection layout.
    """
    config = SFAConfig() if config is None else config
    if not isinstance(config, SFAConfig):
        raise TypeError(f"convert: config must be an SFAConfig, e.g. SFAConfig(topk=8); got {type(config).__name__}")
    examples = _checked_examples(calibration)
    example = example if example is not None else examples[0] if examples else None
    if not is_hf_model(model):
        return _convert_module(model, config, examples, example, refine_steps, progress)
    if getattr(model.config, "sfa", None):
        raise ValueError("convert: this model is already an SFA model (model.config.sfa is set)")
    undo = _Undo(model)
    try:
        return _convert_hf(model, config, examples, example, refine_steps, fold, progress)
    except BaseException:  # a failed or interrupted conversion leaves the model as it was
        undo()
        raise


def _checked_examples(calibration) -> list:
    """The calibration inputs as a list, refused in one line when empty or of a kind no model call takes."""
    if calibration is None:
        return []
    examples = list(calibration)
    if not examples:
        raise ValueError("convert: calibration is empty; pass at least one example input, or leave it out for plain "
                         "top-k")
    check_examples(examples, "convert", "calibration")
    return examples


class _Undo:
    """Puts a Hugging Face model back as it was before conversion started: every module's config object (conversion
    works on copies), no SFA projections, the training flag. Folding R into the weights is the last step, after
    everything that can fail."""

    def __init__(self, model):
        self.model, self.training = model, model.training
        self.modules = list(model.modules())
        self.configs = [m.__dict__.get("config") for m in self.modules]
        self.had_sfa = [hasattr(m, "sfa") for m in self.modules]

    def __call__(self) -> None:
        for module, config, had_sfa in zip(self.modules, self.configs, self.had_sfa):
            if config is not None:
                module.config = config
            if not had_sfa and hasattr(module, "sfa"):
                delattr(module, "sfa")
        self.model.train(self.training)


def _convert_hf(model, config: SFAConfig, examples: list, example, refine_steps: int, fold: bool, progress: bool):
    _own_config(model)
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    layers = attention_layers(model, example if example is not None else model.dummy_inputs)
    if not layers:
        raise ValueError("convert: no attention layer called the attention interface; this model's attention "
                         "is not pluggable through transformers' AttentionInterface")
    modules = dict(model.named_modules())
    converted = {}
    for path, (heads, key_heads, head_dim) in layers.items():
        if not config.converts(path):
            continue
        if config.topk > head_dim:
            raise ValueError(f"convert: topk {config.topk} exceeds the head dim {head_dim} of layer {path!r}")
        module = modules[path]
        module.sfa = SFAProjection(key_heads, head_dim, config.topk).to(next(model.parameters()).device)
        converted[path] = (heads, key_heads, head_dim)
    if not converted:
        raise ValueError(f"convert: SFAConfig.layers={config.layers!r} matches none of the attention layers "
                         f"{sorted(layers)}")
    if examples:
        calibrate(model, examples, steps=refine_steps, progress=progress)
    layouts = {p: _foldable_projections(modules[p], modules[p].sfa, v[0]) for p, v in converted.items()}
    folded = fold and not uses_rope(model) and all(layouts.values())
    if folded:  # all layers or none, so the checkpoint records one projection kind
        for path, (heads, key_heads, head_dim) in converted.items():
            _fold(layouts[path], modules[path].sfa, heads)
            modules[path].sfa = SFAProjection(key_heads, head_dim, config.topk, runtime=False)
    model.config.sfa = {**config.to_dict(), "projection": "folded" if folded else "runtime",
                        "converted_layers": {p: list(v) for p, v in converted.items()}}
    model.config.quantization_config = dict(LOADER_MARKER)  # plain from_pretrained rebuilds it (hf_loading)
    # Recorded in config.json: a from_pretrained without sfa_compile imported then fails loudly ("sfa" is not a
    # registered attention implementation) instead of quietly building a dense model.
    model.config.attn_implementation = ATTN_IMPLEMENTATION
    return model


def _convert_module(model, config, examples, example, refine_steps, progress):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "sfa_settings", None):
        raise ValueError("convert: this module is already an SFA model (it has sfa_settings)")
    if example is None:
        raise ValueError(f"convert: {type(model).__name__} is not a Hugging Face model, so it is traced from an "
                         "example input: pass example=... or calibration=[...] (dicts of keyword arguments, tuples "
                         "or tensors)")
    spec = InputSpec.from_example(model, example)
    gm, sites, reports = rewrite_module(model, config, spec)
    refused = [r for r in reports if not r.rewritten and config.converts(r.module_path)]
    if not sites:
        found = "; ".join(f"{r.module_path or '<root>'}: {r.reason}" for r in refused) or "no attention was found"
        raise ValueError(f"convert: no attention site of {type(model).__name__} could be rewritten ({found})")
    warn_or_raise(left_dense(reports, config), config, "convert")
    gm.sfa_settings = settings(config, spec, sites, type(model))
    if examples:
        calibrate(gm, examples, steps=refine_steps, progress=progress)
    return gm.eval()
