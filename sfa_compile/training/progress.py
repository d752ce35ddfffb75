"""Progress bars for long work (tqdm when installed, on stderr); silent when disabled or unavailable."""

from __future__ import annotations

from typing import Iterable


def progress_bar(items: Iterable, description: str, enabled: bool = True):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, leave=False)
