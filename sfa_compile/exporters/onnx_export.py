"""``export_onnx``: an SFA model to an ONNX file where every FlashSFA is one ``com.sfa::FlashSFA`` node.

The model is exported by torch's own exporter (``torch.onnx.export(..., dynamo=True)``) with a custom
translation for ``sfa::flash_sfa``; everything else (projections, RoPE, the learned top-k projection R,
masks) becomes standard ONNX. Afterwards the model gets the FlashSFA function (onnx_function.py) as a
model-local function, so runtimes without our plugin still run it exactly; the exporter would inline a
function given to it, so it is attached after export. The result passes ``onnx.checker`` with full checks
(strict shape inference runs through the function body), and the file is written atomically: a failed
export leaves nothing at ``path``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from .onnx_function import DOMAIN, DOMAIN_VERSION, MIN_OPSET, OP_NAME, flash_sfa_function, registered_schema

log = logging.getLogger(__name__)

_EXTERNAL_DATA_BYTES = 1 << 30  # initializers above this go to a side file (protobuf caps a file at 2 GiB)


def _translate_flash_sfa(query, key, value, topk, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, dropout_seed=None):
    """onnxscript translation of ``sfa::flash_sfa`` (the exporter calls it with symbolic tensors): the node gives the
    op's output and lse; q~ and k~, the op's outputs for its backward, are never read in an exported graph."""
    import onnxscript
    from onnxscript import opset18 as op

    if dropout_p:
        raise ValueError("export_onnx: attention dropout is active (dropout_p > 0); call model.eval() before export")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if len(t.shape) != 4:
            raise ValueError(f"export_onnx: FlashSFA exports 4-D (batch, heads, length, dim) tensors; {name} has "
                             f"shape {t.shape}")
    head_dim = query.shape[-1]
    if scale is None and not isinstance(head_dim, int):
        raise ValueError("export_onnx: the attention head dim is dynamic, so the default scale 1/sqrt(head dim) is "
                         "unknown; pass dynamic_shapes that keep the head dim static, or an explicit scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    zero = op.CastLike(op.Constant(value_float=0.0), query)
    if attn_mask is None:
        mask = zero  # a scalar 0 broadcasts to every score
    elif attn_mask.dtype == onnxscript.ir.DataType.BOOL:
        mask = op.Where(attn_mask, zero, op.CastLike(op.Constant(value_float=-math.inf), query))
    else:
        mask = attn_mask
    sfa = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
    output, lse = getattr(sfa, OP_NAME)(query, key, value, mask, topk=int(topk), scale=scale, causal=int(is_causal),
                                        _outputs=2)
    return output, lse


def flash_sfa_nodes(model) -> list:
    """The com.sfa::FlashSFA nodes of a ModelProto's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]


def attach_flash_sfa_function(model) -> None:
    """Add the FlashSFA function and the com.sfa opset import to an exported ModelProto (idempotent)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: FlashSFA's function body needs opset >= {MIN_OPSET}, the model has {opset}")
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=DOMAIN_VERSION)
    existing = [i for i, f in enumerate(model.functions) if f.domain == DOMAIN and f.name == OP_NAME]
    for i in reversed(existing):
        del model.functions[i]
    model.functions.append(flash_sfa_function(opset))


def _default_dynamic_shapes(model, args, kwargs):
    """Every dim of every tensor input may vary (torch.export keeps a dim static where the model needs it
    to be), keyed by the forward's parameter names."""
    auto = torch.export.Dim.AUTO

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: auto for i in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **(kwargs or {}))
    return {name: spec(value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training if isinstance(model, torch.nn.Module) else False
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _external_files(path: Path) -> set:
    """The side files (external data) the ONNX model at ``path`` reads, by name."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a readable ONNX file: nothing of ours to clean up
        return set()
    return {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}


def _save_atomically(model, path: Path) -> None:
    """Write ``model`` (and its external data) so that ``path`` always holds a consistent pair: the new data file
    gets a name the current model does not read, the model file replaces the old one in one rename (the commit),
    and only then is the old data file removed. A failure before the commit leaves the old pair untouched."""
    import onnx

    external = sum(len(t.raw_data) for t in model.graph.initializer) > _EXTERNAL_DATA_BYTES
    old_data = _external_files(path) if path.exists() else set()
    data_name = path.name + ".data"
    if data_name in old_data or (path.parent / data_name).exists():
        data_name = f"{path.name}.{secrets.token_hex(4)}.data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-", dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        onnx.save_model(model, tmp_path, save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name)
        onnx.checker.check_model(str(tmp_path), full_check=True)
        placed = None
        try:
            if external:
                placed = path.parent / data_name
                os.replace(Path(tmp) / data_name, placed)
            os.replace(tmp_path, path)
        except BaseException:
            if placed is not None:
                placed.unlink(missing_ok=True)
            raise
    for name in old_data - {data_name}:
        (path.parent / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _without_cache(model, kwargs: Optional[dict]):
    """Export a model's outputs, not its KV cache: ``config.use_cache`` off while exporting, unless the caller
    passed ``use_cache`` (a cache object in the outputs is not exportable)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is None or "use_cache" in (kwargs or {}):
        yield
        return
    before, config.use_cache = config.use_cache, False
    try:
        yield
    finally:
        config.use_cache = before


def export_onnx(model: torch.nn.Module, args: tuple = (), path=None, *, kwargs: Optional[dict[str, Any]] = None,
                dynamic_shapes=None, opset: Optional[int] = None):
    """Export an SFA model to ONNX at ``path`` (returns the ModelProto; also when ``path`` is None).

    ``args``/``kwargs`` are example inputs; ``dynamic_shapes`` follows ``torch.export`` (default: every
    input dim may vary where the model allows it, so batch and sequence length stay dynamic). ``opset``:
    the default-domain opset (default: the exporter's; at least 18). The model is exported in eval mode
    and left in the mode it was in; a Hugging Face model exports without its KV cache (``use_cache=False``)
    unless ``kwargs`` sets ``use_cache``. Raises ValueError when the model runs no FlashSFA (convert it with
    ``sfa_compile.convert`` first).
    """
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be >= {MIN_OPSET} (FlashSFA's function body needs it), got {opset}")
    if dynamic_shapes is None:
        dynamic_shapes = _default_dynamic_shapes(model, args, kwargs)
    with registered_schema(), _eval_mode(model), _without_cache(model, kwargs), torch.no_grad():
        program = torch.onnx.export(
            model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
            custom_translation_table={torch.ops.sfa.flash_sfa.default: _translate_flash_sfa}, verbose=False,
        )
    onnx_model = program.model_proto
    nodes = flash_sfa_nodes(onnx_model)
    if not nodes:
        raise ValueError("export_onnx: the model runs no FlashSFA attention; convert it first "
                         "(sfa_compile.convert(model, SFAConfig(topk=...))) or export it with torch.onnx.export")
    attach_flash_sfa_function(onnx_model)
    log.info("export_onnx: %d FlashSFA nodes", len(nodes))
    if path is not None:
        _save_atomically(onnx_model, Path(path))
    return onnx_model
