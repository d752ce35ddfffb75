"""Save and load converted models: ``sfa_compile.save`` / ``sfa_compile.load``.

A converted Hugging Face model saves with ``save_pretrained`` (safetensors; the SFA settings travel in
config.json under ``sfa``). Writes are atomic: everything goes to a temporary directory beside the target,
which is renamed into place only when complete, so a failed or interrupted save leaves no half-written
output. Loading rebuilds the model with ``from_pretrained``, re-attaches the SFA layers recorded in the
config and loads their projections, refusing missing or mismatched tensors by name. Pickle weight files are
only read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from .convert import attach_projections, is_hf_model
from .integrations.hf_attention import ATTN_IMPLEMENTATION, register


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def atomic_directory(target, force: bool, write) -> Path:
    """Run ``write(tmp_dir)`` then move tmp_dir to ``target``; refuses an existing target unless ``force``."""
    target = Path(target)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass force=True (command line: --force) to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save(model, path, *, force: bool = False) -> Path:
    """Save a converted model to directory ``path`` atomically (see module docstring)."""
    if not is_hf_model(model) or not getattr(model.config, "sfa", None):
        raise TypeError("save: expected a Hugging Face model converted with sfa_compile.convert")
    return atomic_directory(path, force, lambda tmp: model.save_pretrained(tmp))


def _checkpoint_tensors(path: Path, wanted: set) -> dict:
    files = sorted(path.glob("*.safetensors"))
    tensors = {}
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as reader:
                for name in reader.keys():
                    if name in wanted:
                        tensors[name] = reader.get_tensor(name)
        return tensors
    for f in sorted(path.glob("*.bin")):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"load: refusing {f.name}: it does not load with torch.load(weights_only=True) ({err})") from None
        tensors.update({k: v for k, v in state.items() if k in wanted})
    return tensors


def load(path, **from_pretrained_kwargs):
    """Load a model saved by ``save`` (or ``save_pretrained`` of a converted model); returns it in eval mode."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load: {path} has no config.json; expected a directory written by sfa_compile.save")
    config = json.loads(config_file.read_text())
    settings = config.get("sfa")
    if not settings:
        raise ValueError(f"load: {path} is not an SFA checkpoint (config.json has no 'sfa' entry); convert it first")
    import transformers

    register()
    architecture = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, architecture or "", None)
    if cls is None:
        raise ValueError(f"load: unknown architecture {architecture!r} in {config_file}")
    from transformers.utils import logging as hf_logging

    # from_pretrained reports the projection tensors as unexpected (the plain architecture lacks them); they
    # are loaded below, so hide that report for this call only.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    attach_projections(model, settings)
    if settings.get("projection") == "runtime":
        _load_projections(model, path)
    return model.eval()


def _load_projections(model, path: Path) -> None:
    prefixes = ["", f"{model.base_model_prefix}."]
    params = {name: p for name, p in model.named_parameters() if name.endswith(".sfa.weight")}
    candidates = {prefix + name: name for name in params for prefix in prefixes}
    found = _checkpoint_tensors(path, set(candidates))
    loaded = {candidates[k]: v for k, v in found.items()}
    for name, param in params.items():
        if name not in loaded:
            raise ValueError(f"load: the checkpoint in {path} lacks the SFA projection tensor {name!r}")
        if loaded[name].shape != param.shape:
            raise ValueError(f"load: tensor {name!r} has shape {tuple(loaded[name].shape)} in the checkpoint, "
                             f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(loaded[name])
