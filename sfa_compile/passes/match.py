"""Typed results of the attention finders: a match the rewrite consumes, or a refusal with its reason."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.fx as fx


@dataclasses.dataclass
class MaskTerm:
    """One mask step of a hand-written site: an additive float term, or a boolean keep term (True = attend;
    ``negate``: True = masked). ``space`` is the scores' leading shape where it was applied (views between
    the products and the softmax may regroup the batch dims)."""

    node: fx.Node
    space: tuple
    negate: bool = False
    fill: float = float("-inf")  # a keep term's value at masked positions (-inf or a dtype minimum)


@dataclasses.dataclass
class MaskParts:
    """The mask of a hand-written site as SDPA understands it. Empty means no mask."""

    additive: list = dataclasses.field(default_factory=list)  # MaskTerm
    keep: list = dataclasses.field(default_factory=list)  # MaskTerm

    @property
    def kind(self) -> str:
        if self.additive and self.keep:
            return "float+bool"
        return "float" if self.additive else ("bool" if self.keep else "none")


@dataclasses.dataclass
class AttentionMatch:
    """One attention site, ready to rewrite into ``sfa::flash_sfa``."""

    pattern: str  # e.g. "sdpa_call", "matmul_softmax_matmul"
    module_path: str
    output: fx.Node  # the node whose value the rewrite replaces
    query: fx.Node
    key: fx.Node  # (..., S, E), not transposed
    value: fx.Node
    mask: Optional[Union[fx.Node, MaskParts]] = None  # a node (SDPA argument) or parts (hand-written)
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: Optional[float] = None
    traced_scale: tuple = ()  # (SymFloat node, divide) factors applied to scale at run time (dynamic=True)
    enable_gqa: bool = False
    removable: tuple = ()  # nodes of the old subgraph, erased once unused
    space: Optional[tuple] = None  # leading shape to run the op in when views regroup the batch dims, else None

    @property
    def mask_kind(self) -> str:
        if self.mask is None:
            return "causal" if self.is_causal else "none"
        if isinstance(self.mask, MaskParts):
            return self.mask.kind
        return "bool" if getattr(self.mask.meta.get("example_value"), "dtype", None) == torch.bool else "float"


@dataclasses.dataclass
class Refusal:
    """A subgraph that looks like attention but is left untouched, and why."""

    pattern: str
    module_path: str
    anchor: fx.Node
    reason: str


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One row of ``sfa_compile.explain``: what was found where, and what the backend did with it."""

    module_path: str
    pattern: str
    query_shape: tuple
    key_shape: tuple
    mask: str
    gqa_ratio: int
    rewritten: bool
    reason: str = ""
