"""Save and load converted models: ``sfa_compile.save`` / ``sfa_compile.load``.

A converted Hugging Face model saves with ``save_pretrained`` (safetensors; the SFA settings travel in
config.json under ``sfa``). Writes are atomic: everything goes to a temporary directory beside the target,
which is renamed into place only when complete, so a failed or interrupted save leaves no half-written
output. Loading is transformers' ``from_pretrained`` with the "sfa" loader (integrations/hf_loading.py)
re-attaching the SFA layers recorded in the config before the weights load; missing or mismatched tensors
are errors naming the tensor, and pickle weight files are only read with ``torch.load(weights_only=True)``
(transformers' default).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .convert import is_hf_model
from .integrations.hf_attention import register


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


def load(path, **from_pretrained_kwargs):
    """Load a model saved by ``save`` (or ``save_pretrained`` of a converted model); returns it in eval mode.

    The same as ``from_pretrained`` of its architecture once sfa_compile is imported (the "sfa" loader
    re-attaches the projections), with errors that say what is wrong with the directory.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load: {path} has no config.json; expected a directory written by sfa_compile.save")
    config = json.loads(config_file.read_text())
    if not config.get("sfa"):
        raise ValueError(f"load: {path} is not an SFA checkpoint (config.json has no 'sfa' entry); convert it first")
    register()
    cls = architecture_class(config.get("architectures"))
    if cls is None:
        raise ValueError(f"load: unknown architecture {config.get('architectures')!r} in {config_file}")
    return cls.from_pretrained(path, **from_pretrained_kwargs).eval()


def architecture_class(architectures, default=None):
    """The transformers class named first in a config's ``architectures`` (else ``default``)."""
    import transformers

    return getattr(transformers, (architectures or [""])[0] or "", None) or default
