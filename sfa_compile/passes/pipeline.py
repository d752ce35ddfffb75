"""The pass pipeline, in one ordered list: lowering of opaque attention calls, finders, the rewrite, dead code.

``run_pipeline`` returns one SiteReport per attention site it saw (rewritten or refused, with the
reason); it logs, never prints.
"""

from __future__ import annotations

import logging
import warnings

import torch.fx as fx

from ..config import SFAConfig
from .expand_multi_head_attention import expand_multi_head_attention
from .expand_transformer_encoder_layer import expand_transformer_encoder_layer
from .find_handwritten_attention import find_handwritten_attention
from .find_sdpa_calls import find_sdpa_calls
from .gqa import peel_repeated_heads
from .graph_utils import example, may_mutate
from .match import AttentionMatch, Refusal, SiteReport
from .rewrite_attention import rewrite_attention
from .rewrite_to_module import rewrite_to_module

log = logging.getLogger("sfa_compile")

LOWERINGS = (expand_multi_head_attention, expand_transformer_encoder_layer)
FINDERS = (find_sdpa_calls, find_handwritten_attention)


def _shape(node) -> tuple:
    value = example(node)
    return tuple(value.shape) if value is not None else ()


def _gqa_ratio(match: AttentionMatch, peeled) -> int:
    if peeled is not None:
        return peeled[1]
    q, k = example(match.query), example(match.key)
    if q is None or k is None or q.dim() < 3 or not isinstance(k.size(-3), int) or not k.size(-3):
        return 1
    return q.size(-3) // k.size(-3) if isinstance(q.size(-3), int) else 1


def _report(match, rewritten: bool, reason: str = "") -> SiteReport:
    if isinstance(match, Refusal):  # q and k were not established: no shapes to report
        return SiteReport(match.module_path, match.pattern, (), (), "?", 1, False, match.reason)
    peeled = peel_repeated_heads(match.key)
    key = peeled[0] if peeled else match.key
    return SiteReport(match.module_path, match.pattern, _shape(match.query), _shape(key), match.mask_kind,
                      _gqa_ratio(match, peeled), rewritten, reason)


def run_pipeline(gm: fx.GraphModule, config: SFAConfig, rewrite: bool = True, make_site=None) -> list:
    """Find every attention site in ``gm`` and (if ``rewrite``) rewrite the accepted ones in place
    (with ``make_site``, into submodule calls: see rewrite_to_module)."""
    reports = []
    if rewrite:  # lowering first: the finders then see the attention inside
        for lowering in LOWERINGS:
            reports.extend(_report(refusal, False) for refusal in lowering(gm))
    for finder in FINDERS:
        for found in finder(gm):
            if isinstance(found, Refusal):
                reports.append(_report(found, False))
            elif not config.converts(found.module_path):
                reports.append(_report(found, False, f"module path not selected by layers={config.layers!r}"))
            elif not rewrite:
                reports.append(_report(found, False, "explain only"))
            else:
                summary = _report(found, True)  # read shapes before the rewrite erases nodes
                reason = (rewrite_attention(gm, found, config.topk) if make_site is None else
                          rewrite_to_module(gm, found, config.topk, make_site))
                reports.append(summary if reason is None else _report(found, False, reason))
    if rewrite:
        # FX's own purity test keeps in-place methods (x.add_(1)) only in some torch versions: ours keeps them all.
        gm.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or may_mutate(node))
        gm.graph.lint()
        gm.recompile()
    for r in reports:
        log.info("sfa: %s %s at %s (%s)", "rewrote" if r.rewritten else "left dense", r.pattern,
                 r.module_path or "<root>", r.reason or f"mask {r.mask}, gqa {r.gqa_ratio}")
    return reports


class SitesLeftDense(RuntimeError):
    """Raised under ``SFAConfig(strict=True)`` when a selected attention site stays dense."""


def left_dense(reports: list, config: SFAConfig) -> list:
    """(site, reason) of each selected site that computes dense attention: refused, or topk at least its
    head dim (sites the ``layers`` filter leaves out are the user's choice and not listed)."""
    found = []
    for r in reports:
        if not config.converts(r.module_path):
            continue
        if not r.rewritten:
            found.append((r.module_path or "<root>", r.reason))
        elif r.query_shape and r.query_shape[-1] == config.topk:
            found.append((r.module_path or "<root>", f"topk {config.topk} equals the head dim: no feature is dropped"))
    return found


def warn_or_raise(found: list, config: SFAConfig, what: str) -> None:
    """One warning naming how many sites stay dense and the first reason; an error listing all under strict."""
    if not found:
        return
    if config.strict:
        raise SitesLeftDense(f"{what}: {len(found)} attention site(s) stay dense (strict=True): " +
                             "; ".join(f"{path} ({reason})" for path, reason in found))
    path, reason = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    warnings.warn(f"{what}: {len(found)} attention site(s) stay dense: {path} ({reason}){more}; "
                  "sfa_compile.explain(model, *inputs) lists every site and reason", stacklevel=2)
