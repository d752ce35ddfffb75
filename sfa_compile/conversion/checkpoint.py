"""Save and load converted models: ``sfa_compile.save`` / ``sfa_compile.load``.

A converted Hugging Face model saves with ``save_pretrained`` (safetensors; the SFA settings travel in
config.json under ``sfa``). Writes are atomic: everything goes to a temporary directory beside the target,
which is renamed into place only when complete, so a failed or interrupted save leaves no half-written
output. Loading is transformers' ``from_pretrained`` with the "sfa" loader (integrations/hf_loading.py)
re-attaching the SFA layers recorded in the config before the weights load; missing or mismatched tensors
are errors naming the tensor, and pickle weight files are only read with ``torch.load(weights_only=True)``
(transformers' default).

A converted plain module (a GraphModule from module_conversion.py) saves as ``model.safetensors`` plus
``sfa_model.json`` (SFA settings, the traced input spec, the source class). Its code is the user's class, so
loading takes an unconverted instance: ``load(path, model=MyModel(...))`` re-runs the (deterministic) rewrite
on it, checks that the same attention sites come out, and loads the weights strictly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from ..config import SFAConfig
from ..integrations import is_hf_model, register
from ..projection import check_orthogonal, check_settings
from .modules import InputSpec, qualified_name, rewrite_module

MODULE_SETTINGS = "sfa_model.json"
MODULE_WEIGHTS = "model.safetensors"


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is set aside first and put back if the move fails."""
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{tmp.name}")
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


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


# Files of a model directory that hold weights (or index them): never copied beside a converted checkpoint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf", ".index.json")


def copy_other_files(source, directory: Path) -> list[str]:
    """Copy the files of model directory ``source`` that hold no weights (README, sentence-transformers modules,
    generation settings, ...) into ``directory`` where it has no file of that name; returns their relative paths."""
    source = Path(source)
    copied = []
    for file in sorted(source.rglob("*")):
        relative = file.relative_to(source)
        if (not file.is_file() or any(part.startswith(".") for part in relative.parts)
                or file.name.endswith(WEIGHT_SUFFIXES) or (directory / relative).exists()):
            continue
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, directory / relative)
        copied.append(str(relative))
    return copied


def save(model, path, *, force: bool = False, tokenizer=None, copy_from=None) -> Path:
    """Save a converted model to directory ``path`` atomically (see module docstring); a Hugging Face
    ``tokenizer`` given is saved beside it, and ``copy_from`` (the dense model's directory) gives the files that
    hold no weights and that the save did not write, in the same atomic write."""
    if getattr(model, "sfa_settings", None):
        return atomic_directory(path, force, lambda tmp: _save_module(model, tmp))
    if not is_hf_model(model) or not getattr(model.config, "sfa", None):
        raise TypeError("save: expected a model converted with sfa_compile.convert")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if copy_from is not None:
            copy_other_files(copy_from, tmp)

    return atomic_directory(path, force, write)


def _save_module(model, directory: Path) -> None:
    safetensors.torch.save_model(model, str(directory / MODULE_WEIGHTS))  # shared tensors are stored once
    (directory / MODULE_SETTINGS).write_text(json.dumps({"sfa": model.sfa_settings}, indent=2) + "\n")


def load(path, model=None, **from_pretrained_kwargs):
    """Load a model saved by ``save`` (or ``save_pretrained`` of a converted model); returns it in eval mode.

    Hugging Face checkpoints: the same as ``from_pretrained`` of their architecture once sfa_compile is
    imported (the "sfa" loader re-attaches the projections), with errors that say what is wrong with the
    directory. Plain modules: ``model`` is an unconverted instance of the saved class.
    """
    path = Path(path)
    if (path / MODULE_SETTINGS).is_file():
        return _load_module(path, model)
    if model is not None:
        raise ValueError(f"load: {path} is a Hugging Face checkpoint; model= is only for converted plain modules")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load: {path} has neither config.json nor {MODULE_SETTINGS}; expected a directory "
                                "written by sfa_compile.save")
    config = _read_json_object(config_file)
    if not config.get("sfa"):
        raise ValueError(f"load: {path} is not an SFA checkpoint (config.json has no 'sfa' entry); convert it first")
    check_settings(config["sfa"], f"load: {config_file}")
    register()
    cls = architecture_class(config.get("architectures"))
    if cls is None:
        raise ValueError(f"load: unknown architecture {config.get('architectures')!r} in {config_file}")
    try:
        return cls.from_pretrained(path, **from_pretrained_kwargs).eval()
    except Exception as err:  # a truncated or corrupt weights file: name it (the libraries' errors do not)
        broken = _unreadable_weights(path)
        if broken is None:
            raise
        raise ValueError(f"load: {broken} is truncated or corrupt ({err}); re-save the checkpoint") from None


def _read_json_object(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load: {file} is not valid JSON ({err}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise ValueError(f"load: {file} must hold a JSON object, got {type(data).__name__}; re-save the checkpoint")
    return data


def _unreadable_weights(path: Path):
    """The first safetensors file of ``path`` whose tensors cannot all be read, or None."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():
                    reader.get_slice(name)[...]
        except Exception:
            return file
    return None


_MODULE_FIELDS = ("topk", "converted_sites", "inputs", "model_class")


def _load_module(path: Path, model):
    settings = _read_json_object(path / MODULE_SETTINGS).get("sfa")
    missing = [f for f in _MODULE_FIELDS if f not in settings] if isinstance(settings, dict) else ["sfa"]
    if missing:
        raise ValueError(f"load: {path / MODULE_SETTINGS} lacks the SFA settings {missing}; it was not written by "
                         "sfa_compile.save (re-convert the model and save it)")
    saved_class = settings["model_class"]
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load: {path} holds a converted {saved_class}; pass an unconverted instance of it: "
                        f"sfa_compile.load({str(path)!r}, model=...)")
    own_class = qualified_name(type(model))
    if own_class != saved_class:
        raise TypeError(f"load: {path} holds a converted {saved_class}, but model= is a {own_class}")
    try:
        config = SFAConfig.from_dict({k: settings[k] for k in SFAConfig.field_names() if k in settings})
    except (TypeError, ValueError) as err:
        raise ValueError(f"load: {path / MODULE_SETTINGS}: 'sfa' settings: {err}") from None
    gm, sites, _ = rewrite_module(model, config, InputSpec(**settings["inputs"]))
    if sites != settings["converted_sites"]:
        raise ValueError(f"load: converting this {own_class} gives attention sites {sites}, but {path} was saved "
                         f"with {settings['converted_sites']}; the class changed since the checkpoint was written")
    try:
        safetensors.torch.load_model(gm, str(path / MODULE_WEIGHTS), strict=True)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"load: the weights in {path / MODULE_WEIGHTS} do not fit this model: {err}") from None
    check_orthogonal(gm)
    gm.sfa_settings = settings
    return gm.eval()


def architecture_class(architectures, default=None):
    """The transformers class named first in a config's ``architectures`` (else ``default``)."""
    import transformers

    return getattr(transformers, (architectures or [""])[0] or "", None) or default
