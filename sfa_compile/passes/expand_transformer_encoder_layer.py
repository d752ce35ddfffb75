"""Pass: expand ``torch._transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer``'s inference fast path:
eval mode, no grad, batch_first) into the layer's own steps, so the SDPA finder sees its attention.

Emits what the fast path computes: packed in-projection, heads split, SDPA with the mask as the fast path reads
it (True or nonzero = masked, turned into SDPA's boolean True = attend), heads merged, out-projection,
the ReLU or GELU feed-forward, and the two layer norms before (``norm_first``) or after each residual. A row
whose keys are all masked gives a zero attention output on both paths. Refuses (left as it is, with a reason)
masks of other dtypes, mask types other than key padding (B, S) and merged (B, H, L, S), and sizes that are not static.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import example, static_int
from .inline import expand_calls

PATTERN = "transformer_encoder_layer"
_PARAMETERS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
               "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1",
               "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")
_INPUTS = ("src", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm_weight_1", "norm_bias_1",
           "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask")


def _bind(node: fx.Node) -> Optional[dict]:
    if len(node.args) > len(_PARAMETERS) or not set(node.kwargs) <= set(_PARAMETERS):
        return None
    args = {"mask": None, "mask_type": None, **dict(zip(_PARAMETERS, node.args)), **node.kwargs}
    return args if len(args) == len(_PARAMETERS) else None


def _refusal(args: Optional[dict]) -> Optional[str]:
    if args is None:
        return "called with arguments it does not take"
    if not all(isinstance(args[f], bool) for f in ("use_gelu", "norm_first")) or not isinstance(
            args["eps"], (int, float)):
        return "flags or eps are not constants"
    src = example(args["src"])
    if src is None or src.dim() != 3 or not all(static_int(s) for s in src.shape):
        return "unbatched input or sizes that are not static"
    if static_int(args["num_heads"]) is None or src.size(2) % args["num_heads"]:
        return "head count is not a static divisor of the width"
    mask = example(args["mask"])
    if args["mask"] is not None:
        if mask is None or not (mask.dtype == torch.bool or mask.is_floating_point()):
            return "a mask that is neither boolean nor floating"
        b, length = src.size(0), src.size(1)
        if not ((args["mask_type"] == 1 and tuple(mask.shape) == (b, length)) or (
                args["mask_type"] == 2 and mask.dim() == 4 and tuple(mask.shape[-2:]) == (length, length))):
            return f"mask type {args['mask_type']} with shape {tuple(mask.shape)}"
    return None


def _expansion(args: dict, sizes: tuple):
    batch, length, width = sizes
    heads = args["num_heads"]
    head_dim = width // heads
    use_gelu, norm_first, eps = args["use_gelu"], args["norm_first"], float(args["eps"])
    has_mask = args["mask"] is not None
    boolean = has_mask and example(args["mask"]).dtype == torch.bool
    padding = has_mask and args["mask_type"] == 1

    def expanded(src, w_in, b_in, w_out, b_out, n1_w, n1_b, n2_w, n2_b, w1, b1, w2, b2, mask):
        def attention(x):
            qkv = F.linear(x, w_in, b_in).view(batch, length, 3, heads, head_dim)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            keep = None
            if has_mask:
                # the fast path masks where the mask is nonzero, also for float masks (0 / -inf as the layer makes them)
                keep = ~mask if boolean else mask == 0
                keep = keep.view(batch, 1, 1, length) if padding else keep
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            return F.linear(out.transpose(1, 2).reshape(batch, length, width), w_out, b_out)

        def feed_forward(x):
            hidden = F.linear(x, w1, b1)
            return F.linear(F.gelu(hidden) if use_gelu else F.relu(hidden), w2, b2)

        if norm_first:
            x = src + attention(F.layer_norm(src, (width,), n1_w, n1_b, eps))
            return x + feed_forward(F.layer_norm(x, (width,), n2_w, n2_b, eps))
        x = F.layer_norm(src + attention(src), (width,), n1_w, n1_b, eps)
        return F.layer_norm(x + feed_forward(x), (width,), n2_w, n2_b, eps)

    return expanded


def _plan(node: fx.Node):
    args = _bind(node)
    reason = _refusal(args)
    if reason is not None:
        return reason
    src = example(args["src"])
    return _expansion(args, tuple(src.shape)), [args[name] for name in _INPUTS], src.fake_mode


def _replace(node: fx.Node, out: fx.Node) -> None:
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)


def expand_transformer_encoder_layer(gm: fx.GraphModule) -> list:
    """Expand every eligible call in place; returns a Refusal for each call left as it is."""
    return expand_calls(gm, torch._transformer_encoder_layer_fwd, PATTERN, "transformer encoder fast path", _plan,
                        _replace)
