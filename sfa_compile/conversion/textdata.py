"""Built-in text for calibration and fine-tuning from the command line: real English sentences shipped with
the package (sfa_compile/data/sentences.txt, from CPython's docstrings; benchmarks/make_sentences.py)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch


def builtin_sentences() -> list[str]:
    return resources.files("sfa_compile").joinpath("data/sentences.txt").read_text().splitlines()


def text_examples(model_dir, config, count: int, batch_size: int = 16, labels: bool = False) -> list[dict]:
    """``count`` built-in sentences as keyword-argument batches for the model in ``model_dir``: tokenized
    with its tokenizer when it has one, else random token ids of its vocabulary (seeded)."""
    sentences = builtin_sentences()[:count]
    if not sentences:
        return []
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(model_dir))
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = []
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i:i + batch_size]
        if tokenizer is not None:
            batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt"))
        else:
            vocab = getattr(config, "vocab_size", None)
            if not vocab:
                raise ValueError(f"{model_dir} has no tokenizer and its config no vocab_size: cannot make text inputs")
            batch = {"input_ids": torch.randint(0, vocab, (len(chunk), 32), generator=gen)}
        if labels:  # causal LM: predict every real token, ignore padding
            mask = batch.get("attention_mask")
            batch["labels"] = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, -100)
        examples.append(batch)
    return examples
