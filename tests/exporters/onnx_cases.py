"""Helpers for the ONNX tests: a one-node FlashSFA model, sessions with and without the plugin, and which
operators a session really ran (from ONNX Runtime's profile)."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from sfa_compile import ort_session
from sfa_compile.exporters.onnx_export import attach_flash_sfa_function
from sfa_compile.exporters.onnx_function import DOMAIN, DOMAIN_VERSION, OP_NAME


def single_node_model(topk: int, scale: float, causal: bool, mask_rank: int, elem_type: int = TensorProto.FLOAT,
                      ranked: bool = True):
    """query/key/value/attn_mask inputs of dynamic shape (``elem_type``) -> one FlashSFA node, function attached;
    not ``ranked``: inputs and outputs of any rank (not checked: the node's own checks are under test)."""
    dims = ["b", "h", "l", "e"], ["b", "hk", "s", "e"], ["b", "hk", "s", "ev"]
    inputs = [helper.make_tensor_value_info(n, elem_type, d) for n, d in zip(("q", "k", "v"), dims)]
    inputs.append(helper.make_tensor_value_info("mask", elem_type, [f"m{i}" for i in range(mask_rank)]))
    outputs = ["out", "lse"]
    output_dims = {"out": ["b", "h", "l", "ev"], "lse": ["b", "h", "l"]}
    node = helper.make_node(OP_NAME, ["q", "k", "v", "mask"], outputs, domain=DOMAIN, topk=topk, scale=scale,
                            causal=int(causal))
    graph = helper.make_graph([node], "flash_sfa", inputs,
                              [helper.make_tensor_value_info(n, elem_type if n == "out" else TensorProto.FLOAT,
                                                             output_dims[n]) for n in outputs])
    # IR version 10, as torch's exporter writes: onnx's newest IR version is newer than some runtimes load.
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    attach_flash_sfa_function(model)
    if not ranked:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.ClearField("shape")
        return model
    onnx.checker.check_model(model, full_check=True)
    return model


def run(path, feeds: dict, plugin: bool):
    """(outputs, operator types ONNX Runtime executed) for the model at ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path) + ".profile"
    session = ort_session(path, plugin=plugin, sess_options=options)
    names = {i.name for i in session.get_inputs()}
    outputs = session.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in names})
    with open(session.end_profiling()) as f:
        ran = {e["args"].get("op_name") for e in json.load(f) if e.get("cat") == "Node"}
    return outputs, ran


def relative_error(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
