"""Pass: expand ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and the ``nn.Transformer*``
layers call, kept opaque by Dynamo) into its projections, one SDPA call and the output projection, so the
SDPA finder sees the attention.

Matches calls whose attention weights are unused (``need_weights=False``, or the weights output read by
nobody) with static sizes and 3-D (sequence-first) inputs. Emits exactly what the function computes on its
SDPA path: packed or separate in-projections, heads split as (batch, heads, length, head dim), the key padding
mask and attention mask merged as float masks (True = masked becomes -inf), the ``is_causal`` hint honoured as
the function honours it, dropout only in training, then the output projection. Refuses (left as it is, with a
reason) ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``, unbatched inputs and arguments
that are not constants.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import example, static_int
from .inline import expand_calls

PATTERN = "multi_head_attention"
_PARAMETERS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
               "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
               "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
               "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None,
             "static_k": None, "static_v": None, "average_attn_weights": True, "is_causal": False}


def _bind(node: fx.Node) -> Optional[dict]:
    if len(node.args) > len(_PARAMETERS) or not set(node.kwargs) <= set(_PARAMETERS):
        return None
    args = {**_DEFAULTS, **dict(zip(_PARAMETERS, node.args)), **node.kwargs}
    return args if len(args) == len(_PARAMETERS) else None


def _float_mask(mask: torch.Tensor, is_bool: bool, dtype: torch.dtype) -> torch.Tensor:
    """F.multi_head_attention_forward's canonical mask: boolean True (masked) becomes -inf, floats stay."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf")) if is_bool else mask


def _expansion(args: dict, sizes: tuple, dtype: torch.dtype):
    """The function's SDPA path as plain PyTorch for these static sizes and flags (traced by torch.fx)."""
    tgt_len, src_len, bsz, embed_dim, heads = sizes
    head_dim = embed_dim // heads
    separate = bool(args["use_separate_proj_weight"])
    has_in_bias, has_out_bias = args["in_proj_bias"] is not None, args["out_proj_bias"] is not None
    has_kpm, has_mask = args["key_padding_mask"] is not None, args["attn_mask"] is not None
    dropout_p = float(args["dropout_p"]) if args["training"] else 0.0
    is_causal = bool(args["is_causal"])
    if is_causal and has_kpm:
        is_causal = False  # the function merges the key padding mask into attn_mask and drops the hint
    use_mask = has_mask and not (is_causal and not has_kpm)  # the hint alone stands for the mask otherwise
    mask_value, kpm_value = example(args["attn_mask"]), example(args["key_padding_mask"])
    mask_2d = use_mask and mask_value.dim() == 2
    rows = None  # leading size of the merged 3-D mask, decided here as the function decides it at run time
    if use_mask:
        rows = 1 if mask_2d else mask_value.size(0)
    if has_kpm:
        rows = bsz * heads if rows is None else max(rows, bsz * heads)

    def expanded(query, key, value, w_in, b_in, w_q, w_k, w_v, w_out, b_out, kpm, attn_mask):
        if separate:
            b_q, b_k, b_v = b_in.chunk(3) if has_in_bias else (None, None, None)
        else:
            w_q, w_k, w_v = w_in.chunk(3)
            b_q, b_k, b_v = b_in.chunk(3) if has_in_bias else (None, None, None)
        q = F.linear(query, w_q, b_q).view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = F.linear(key, w_k, b_k).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = F.linear(value, w_v, b_v).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        mask = None
        if use_mask:
            mask = _float_mask(attn_mask, mask_value.dtype == torch.bool, dtype)
            if mask_2d:
                mask = mask.unsqueeze(0)
        if has_kpm:
            pad = _float_mask(kpm, kpm_value.dtype == torch.bool, dtype).view(bsz, 1, 1, src_len)
            pad = pad.expand(-1, heads, -1, -1)
            pad = pad.reshape(bsz * heads, 1, src_len)
            mask = pad if mask is None else mask + pad
        if mask is not None:
            mask = mask.unsqueeze(0) if rows == 1 else mask.view(bsz, heads, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, head_dim),
                                             k.view(bsz, heads, src_len, head_dim),
                                             v.view(bsz, heads, src_len, head_dim),
                                             attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        return F.linear(out, w_out, b_out if has_out_bias else None).view(tgt_len, bsz, embed_dim)

    return expanded


_INPUTS = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
           "v_proj_weight", "out_proj_weight", "out_proj_bias", "key_padding_mask", "attn_mask")


def _refusal(node: fx.Node, args: Optional[dict]) -> Optional[str]:
    if args is None:
        return "called with arguments it does not take"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if args[name] is not None:
            return f"{name} is set"
    if args["add_zero_attn"] is not False:
        return "add_zero_attn is set"
    flags = ("training", "need_weights", "use_separate_proj_weight", "is_causal")
    if not all(isinstance(args[f], bool) for f in flags) or not isinstance(args["dropout_p"], (int, float)):
        return "flags or dropout_p are not constants"
    weights_read = any(u.target is operator.getitem and u.args[1] != 0 and u.users for u in node.users) or any(
        u.target is not operator.getitem for u in node.users)
    if args["need_weights"] and weights_read:
        return "the attention weights are used"
    if args["is_causal"] and args["attn_mask"] is None:
        return "is_causal without attn_mask (the function raises)"
    values = [example(args[name]) for name in ("query", "key", "value")]
    if any(v is None or v.dim() != 3 for v in values):
        return "unbatched or non-tensor inputs"
    sizes = [values[0].size(0), values[1].size(0), values[0].size(1), values[0].size(2), args["num_heads"]]
    if not all(static_int(s) for s in sizes) or sizes[3] % sizes[4]:
        return "sizes are not static"
    return None


def _plan(node: fx.Node):
    args = _bind(node)
    reason = _refusal(node, args)
    if reason is not None:
        return reason
    query, key = example(args["query"]), example(args["key"])
    sizes = (query.size(0), key.size(0), query.size(1), query.size(2), args["num_heads"])
    return _expansion(args, sizes, query.dtype), [args[name] for name in _INPUTS], query.fake_mode


def _replace(node: fx.Node, out: fx.Node) -> None:
    for user in list(node.users):  # getitem 0 is the output; the unused weights' getitem goes too
        if user.target is operator.getitem and user.args[1] == 0:
            user.replace_all_uses_with(out)
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def expand_multi_head_attention(gm: fx.GraphModule) -> list:
    """Expand every eligible call in place; returns a Refusal for each call left as it is."""
    return expand_calls(gm, F.multi_head_attention_forward, PATTERN, "multi_head_attention_forward", _plan, _replace)
