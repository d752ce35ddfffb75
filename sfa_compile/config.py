"""SFAConfig: the one place where every SFA setting and its default lives.

Everything else (the op wrapper, the backend, conversion, the CLI) reads its defaults from here.
The JSON form carries a ``version`` so checkpoints written by a newer release fail loudly instead of
being misread.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SFAConfig:
    r"""Settings of Sparse Feature Attention.

    Attributes:
        topk: features kept per token and head, for queries and keys separately (1 <= topk <= head dim;
            the head-dim bound is checked where the head dim is known). topk == head dim is dense attention.
        layers: regular expression over module paths (e.g. ``r"layers\.(0|1)\."``); only attention sites
            whose path matches (re.search) become SFA, the rest stay dense. None converts every site.
        strict: any selected attention site left dense (refused, or topk above its head dim) is an error that
            lists the sites and reasons, instead of a warning.
        version: format version of the serialized config; only ``CONFIG_VERSION`` is accepted.
    """

    topk: int = 16
    layers: Optional[str] = None
    strict: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"SFAConfig.topk must be an integer >= 1, got {self.topk!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"SFAConfig.strict must be True or False, got {self.strict!r}")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except (re.error, TypeError) as err:
                raise ValueError(f"SFAConfig.layers must be a regular expression, got {self.layers!r}: {err}") from None
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"SFAConfig.version {self.version!r} is not supported by this sfa-compile "
                f"(supported: {CONFIG_VERSION}); upgrade sfa-compile to read this config"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def converts(self, module_path: str) -> bool:
        """Whether the attention site at ``module_path`` should become SFA."""
        return self.layers is None or re.search(self.layers, module_path) is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SFAConfig":
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown SFAConfig field(s) {unknown}; valid fields: {list(cls.field_names())}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SFAConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"SFAConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)
