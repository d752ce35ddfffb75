"""``sfa_compile.explain``: which attention sites a model has and what the backend does with each."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import SFAConfig
from .passes.pipeline import run_pipeline


@dataclasses.dataclass
class Explanation:
    sites: list  # SiteReport
    graphs: int  # Dynamo graphs seen (more than one means graph breaks)

    def table(self) -> str:
        header = ("module", "pattern", "query", "key", "mask", "gqa", "result")
        rows = [header] + [
            (s.module_path or "<root>", s.pattern, "x".join(map(str, s.query_shape)), "x".join(map(str, s.key_shape)),
             s.mask, str(s.gqa_ratio), "rewritten" if s.rewritten else f"dense: {s.reason}")
            for s in self.sites
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        lines.append(f"{sum(s.rewritten for s in self.sites)} of {len(self.sites)} attention sites rewritten, "
                     f"{self.graphs} graph(s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def explain(model: torch.nn.Module, *example_args, sfa_config: Optional[SFAConfig] = None,
            **example_kwargs) -> Explanation:
    """Trace ``model`` on the example inputs with Dynamo and report every attention site: module path,
    pattern, shapes, mask kind, GQA ratio, and whether the "sfa" backend rewrites it or why not."""
    config = sfa_config or SFAConfig()
    sites, graphs = [], 0

    def collect(gm, example_inputs):
        nonlocal graphs
        graphs += 1
        sites.extend(run_pipeline(gm, config))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=collect, dynamic=False)(*example_args, **example_kwargs)
    return Explanation(sites, graphs)
