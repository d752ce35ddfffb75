"""Built-in text for calibration and fine-tuning from the command line: real English sentences shipped with
the package (sfa_compile/data/sentences.txt, from CPython's docstrings; benchmarks/make_sentences.py)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def builtin_sentences() -> list[str]:
    return resources.files("sfa_compile").joinpath("data/sentences.txt").read_text().splitlines()


def local_tokenizer(model_dir, download: bool = False):
    """The tokenizer saved in ``model_dir`` (read from disk only unless ``download``: then a Hub id), or None when
    it has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir if download else Path(model_dir), local_files_only=not download)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def required_tokenizer(model_dir, download: bool = False, without: str = ""):
    """``local_tokenizer``, or an error naming the fix: text for calibration and fine-tuning needs one (never
    random ids posing as text). ``without``: how the command runs without text, named in the error."""
    tokenizer = local_tokenizer(model_dir, download)
    if tokenizer is None:
        alternative = f", or {without}" if without else ""
        raise ValueError(f"{model_dir} has no tokenizer, and calibration and fine-tuning text needs one (save it "
                         f"there with tokenizer.save_pretrained{alternative})")
    return tokenizer


def text_examples(tokenizer, count: int, batch_size: int = 16, labels: bool = False) -> list[dict]:
    """``count`` built-in sentences as keyword-argument batches, tokenized with ``tokenizer``."""
    sentences = builtin_sentences()[:count]
    borrowed_pad = tokenizer.pad_token is None  # padding needs one; the caller's tokenizer is left as it was
    if borrowed_pad:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        examples = []
        for i in range(0, len(sentences), batch_size):
            chunk = sentences[i:i + batch_size]
            batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt"))
            if labels:  # causal LM: predict every real token, ignore padding
                mask = batch.get("attention_mask")
                batch["labels"] = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(
                    mask == 0, -100)
            examples.append(batch)
    finally:
        if borrowed_pad:
            tokenizer.pad_token = None
    return examples
