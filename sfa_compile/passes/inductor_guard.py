"""Keep Inductor's attention fusion off the graphs the "sfa" backend hands over, scoped to that compile call.

Inductor rewrites attention-shaped chains into SDPA in its joint-graph patterns (fuse_attention), and in
torch 2.13 also chains that are not attention: softmax over the query axis becomes SDPA over the key axis
(pytorch/pytorch#196468, a silent wrong result). We own attention detection: what our passes rewrote is already
``sfa::flash_sfa``, and every softmax left in the graph was refused or left dense on purpose. So before the joint
patterns run, each softmax (``aten._softmax``, and ``aten.amax``, the first step of its decomposed form in
inference graphs) is renamed to a target no pattern knows, and renamed back right after; nothing else Inductor
does changes. The two passes ride on ``compile_fx``'s ``config_patches``, which covers the
lazily compiled backward too, and run before/after any custom joint passes the user configured.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

# Inductor's caches key compiled graphs by the passes' uuid: naming this file and the op registrations (schemas,
# autograd formulas, fake shapes, all baked into compiled code) makes an upgrade of either a new key, not a stale hit.
_CODE_HASH = hashlib.sha256(b"".join(path.read_bytes() for path in (
    pathlib.Path(__file__), *sorted((pathlib.Path(__file__).parents[1] / "kernels").glob("*.py"))))).hexdigest()


def hidden_softmax(*args):
    """Stands in for aten._softmax between the two passes (never called: the graph is not run meanwhile)."""
    return torch.ops.aten._softmax.default(*args)


def hidden_amax(*args):
    """Stands in for aten.amax between the two passes."""
    return torch.ops.aten.amax.default(*args)


_HIDDEN = {torch.ops.aten._softmax.default: hidden_softmax, torch.ops.aten.amax.default: hidden_amax}


class _Retarget(CustomGraphPass):
    def __init__(self, targets: dict, others: tuple, before: bool):
        self.targets, self.others, self.before = targets, others, before

    def __call__(self, graph: fx.Graph) -> None:
        if not self.before:
            self._run_others(graph)
        for node in graph.nodes:
            if node.op == "call_function" and node.target in self.targets:
                node.target = self.targets[node.target]
        if self.before:
            self._run_others(graph)

    def _run_others(self, graph: fx.Graph) -> None:
        for other in self.others:
            other(graph)

    def uuid(self) -> Any:
        others = tuple(o.uuid() if isinstance(o, CustomGraphPass) else None for o in self.others)
        return (_CODE_HASH, self.before, others) if None not in others else None


def _configured(passes) -> tuple:
    """The user's joint passes as a tuple (the setting holds None, one pass, or a list of them)."""
    if passes is None:
        return ()
    return tuple(passes) if isinstance(passes, (list, tuple)) else (passes,)


def config_patches(user: Optional[dict] = None) -> dict:
    """Inductor config for one compile call: softmax hidden from the joint-graph patterns; the joint passes the
    user configured (in ``user``, the call's own patches, else in Inductor's config) still run."""
    from torch._inductor import config

    user = user or {}
    pre = _configured(user.get("joint_custom_pre_pass", config.joint_custom_pre_pass))
    post = _configured(user.get("joint_custom_post_pass", config.joint_custom_post_pass))
    restore = {hidden: op for op, hidden in _HIDDEN.items()}
    return {"joint_custom_pre_pass": _Retarget(_HIDDEN, pre, before=False),
            "joint_custom_post_pass": _Retarget(restore, post, before=True)}
