"""The ``com.sfa::FlashSFA`` ONNX operator: its contract, its schema and its standard-ONNX function body.

Node contract (what the exporter emits, the runtime plugin implements and the function body computes):

    FlashSFA <topk: int, scale: float, causal: int> (query, key, value, attn_mask) => (output, lse)

    query (B, H, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev); H a multiple of Hk (GQA: query head h
    reads key/value head h // (H / Hk)). attn_mask: additive float mask broadcasting (numpy rules) to
    (B, H, L, S); the exporter turns boolean masks into 0 / -inf and passes a scalar 0 when there is none.
    causal = 1 hides key j from query row i when j > i (top-left aligned, as SDPA's is_causal).
    output (B, H, L, Ev) = softmax(topk(q) . topk(k) * scale + mask) @ v, where topk keeps each row's
    ``topk`` largest-magnitude features (ties: lower feature index) and zeroes the rest; rows whose keys
    are all hidden give zeros. lse (B, H, L), float32: log-sum-exp of the row's masked scores, +inf for
    fully hidden rows (the torch op's second output; inference graphs leave it unused, and onnx's shape
    inference of function calls wants every function output bound, so the node always has both).

The function body uses only standard ONNX ops (TopK, GatherElements, ScatterElements, MatMul, ...) and
computes in float32, so any runtime runs an exported model exactly without our plugin; with the plugin
loaded, ONNX Runtime runs the node's sparse kernel instead of inlining the body. The body references the
node's attributes (``@topk``, ``@scale``, ``@causal``), so one function serves every call site.
"""

from __future__ import annotations

import contextlib

DOMAIN = "com.sfa"
OP_NAME = "FlashSFA"
DOMAIN_VERSION = 1
MIN_OPSET = 18  # Reduce* with axes as an input, Shape with start/end

_BODY = """
{
   k_scalar = Constant <value_int: int = @topk> ()
   one_dim = Constant <value_ints: ints = [1]> ()
   k_count = Reshape (k_scalar, one_dim)
   zero = Constant <value_float: float = 0.0> ()
   q_unchecked = Cast <to: int = 1> (query)
   k_unchecked = Cast <to: int = 1> (key)
   v = Cast <to: int = 1> (value)
   mask = Cast <to: int = 1> (attn_mask)
   q_dims = Shape (q_unchecked)
   k_dims = Shape (k_unchecked)
   v_dims = Shape (v)
   m_dims = Shape (mask)
{guard}
   q = Add (q_unchecked, guard)
   kf = Add (k_unchecked, guard)

{sparsify_q}{sparsify_k}
   batch = Shape <start: int = 0, end: int = 1> (q)
   heads = Shape <start: int = 1, end: int = 2> (q)
   q_len = Shape <start: int = 2, end: int = 3> (q)
   kv_heads = Shape <start: int = 1, end: int = 2> (kf)
   kv_len = Shape <start: int = 2, end: int = 3> (kf)
   head_dim = Shape <start: int = 3, end: int = 4> (kf)
   v_dim = Shape <start: int = 3, end: int = 4> (v)
   group = Div (heads, kv_heads)
   axis2 = Constant <value_ints: ints = [2]> ()
   k_one_group = Unsqueeze (k_sparse, axis2)
   v_one_group = Unsqueeze (v, axis2)
   k_grouped_shape = Concat <axis: int = 0> (batch, kv_heads, group, kv_len, head_dim)
   v_grouped_shape = Concat <axis: int = 0> (batch, kv_heads, group, kv_len, v_dim)
   k_grouped = Expand (k_one_group, k_grouped_shape)
   v_grouped = Expand (v_one_group, v_grouped_shape)
   k_rep_shape = Concat <axis: int = 0> (batch, heads, kv_len, head_dim)
   v_rep_shape = Concat <axis: int = 0> (batch, heads, kv_len, v_dim)
   k_rep = Reshape (k_grouped, k_rep_shape)
   v_rep = Reshape (v_grouped, v_rep_shape)

   k_t = Transpose <perm: ints = [0, 1, 3, 2]> (k_rep)
   scale_value = Constant <value_float: float = @scale> ()
   raw_scores = MatMul (q_sparse, k_t)
   scaled = Mul (raw_scores, scale_value)
   masked = Add (scaled, mask)

   zero_i = Constant <value_int: int = 0> ()
   one_i = Constant <value_int: int = 1> ()
   q_len_scalar = Squeeze (q_len)
   kv_len_scalar = Squeeze (kv_len)
   rows = Range (zero_i, q_len_scalar, one_i)
   cols = Range (zero_i, kv_len_scalar, one_i)
   axis0 = Constant <value_ints: ints = [0]> ()
   row_column = Unsqueeze (rows, one_dim)
   column_row = Unsqueeze (cols, axis0)
   future = Greater (column_row, row_column)
   causal_int = Constant <value_int: int = @causal> ()
   causal_flag = Cast <to: int = 9> (causal_int)
   hidden = And (future, causal_flag)
   neg_inf = Constant <value_float: float = -inf> ()
   scores = Where (hidden, neg_inf, masked)

   last = Constant <value_ints: ints = [-1]> ()
   row_max = ReduceMax <keepdims: int = 1> (scores, last)
   max_is_neg_inf = IsInf <detect_positive: int = 0> (row_max)
   safe_max = Where (max_is_neg_inf, zero, row_max)
   shifted = Sub (scores, safe_max)
   e = Exp (shifted)
   denom = ReduceSum <keepdims: int = 1> (e, last)
   empty_row = Equal (denom, zero)
   one = Constant <value_float: float = 1.0> ()
   safe_denom = Where (empty_row, one, denom)
   probs = Div (e, safe_denom)
   out = MatMul (probs, v_rep)
   output = CastLike (out, query)

   pos_inf = Constant <value_float: float = inf> ()
   log_denom = Log (denom)
   lse_finite = Add (safe_max, log_denom)
   lse_kept = Where (empty_row, pos_inf, lse_finite)
   lse = Squeeze (lse_kept, last)
}
"""


# The plugin's argument checks, as data: each condition is a bool; ``guard`` is 0.0 when all hold, and gathering
# index 1 of a one-element tensor (a run-time error in every runtime) when one does not, so the function body
# refuses exactly the inputs the plugin refuses (GUARD_NODE names the node in the runtime's error).
GUARD_NODE = "FlashSFA_needs_4D_query_key_value_matching_shapes_topk_le_head_dim_and_mask_broadcasting_to_scores"
_GUARD = """
   four = Constant <value_int: int = 4> ()
   two_1d = Constant <value_ints: ints = [2]> ()
   three_1d = Constant <value_ints: ints = [3]> ()
   four_1d = Constant <value_ints: ints = [4]> ()
   pad4 = Constant <value_ints: ints = [1, 1, 1, 1]> ()
   minus4 = Constant <value_ints: ints = [-4]> ()
   big = Constant <value_ints: ints = [9223372036854775807]> ()
   axis_0 = Constant <value_ints: ints = [0]> ()
{dims}
   q_4d = Equal (q_rank, four)
   k_4d = Equal (k_rank, four)
   v_4d = Equal (v_rank, four)
   m_le_4d = LessOrEqual (m_rank, four)
   ranks_ok_a = And (q_4d, k_4d)
   ranks_ok_b = And (v_4d, m_le_4d)
   ranks_ok = And (ranks_ok_a, ranks_ok_b)
   select_b = Constant <value_ints: ints = [1, 0, 0, 0]> ()
   select_bhs = Constant <value_ints: ints = [1, 1, 1, 0]> ()
   select_d = Constant <value_ints: ints = [0, 0, 0, 1]> ()
   q_b = Mul (q_last4, select_b)
   k_b = Mul (k_last4, select_b)
   k_bhs = Mul (k_last4, select_bhs)
   v_bhs = Mul (v_last4, select_bhs)
   q_d = Mul (q_last4, select_d)
   k_d = Mul (k_last4, select_d)
   same_batch = Equal (q_b, k_b)
   same_kv = Equal (k_bhs, v_bhs)
   same_dim = Equal (q_d, k_d)
   same_ab = And (same_batch, same_kv)
   same_all = And (same_ab, same_dim)
   same_int = Cast <to: int = 7> (same_all)
   same_min = ReduceMin <keepdims: int = 0> (same_int)
   one_i64 = Constant <value_int: int = 1> ()
   shapes_ok = Equal (same_min, one_i64)
   q_heads = Slice (q_last4, one_dim, two_1d, axis_0)
   k_heads = Slice (k_last4, one_dim, two_1d, axis_0)
   k_heads_safe = Max (k_heads, one_dim)
   heads_rem = Mod (q_heads, k_heads_safe)
   zero_1d = Constant <value_ints: ints = [0]> ()
   heads_ok_1d = Equal (heads_rem, zero_1d)
   heads_ok = Squeeze (heads_ok_1d)
   k_dim = Slice (k_last4, three_1d, four_1d, axis_0)
   topk_le = LessOrEqual (k_count, k_dim)
   topk_ok = Squeeze (topk_le)
   q_bhl = Slice (q_last4, zero_1d, three_1d, axis_0)
   k_s = Slice (k_last4, two_1d, three_1d, axis_0)
   scores_last4 = Concat <axis: int = 0> (q_bhl, k_s)
   m_is_one = Equal (m_last4, one_i64)
   m_fits = Equal (m_last4, scores_last4)
   m_dim_ok = Or (m_is_one, m_fits)
   m_dim_int = Cast <to: int = 7> (m_dim_ok)
   m_dim_min = ReduceMin <keepdims: int = 0> (m_dim_int)
   mask_ok = Equal (m_dim_min, one_i64)
   ok_a = And (ranks_ok, shapes_ok)
   ok_b = And (heads_ok, topk_ok)
   ok_c = And (ok_a, ok_b)
   ok = And (ok_c, mask_ok)
   zero_i64 = Constant <value_int: int = 0> ()
   guard_index = Where (ok, zero_i64, one_i64)
   guard_values = Constant <value_floats: floats = [0.0]> ()
   guard = Gather (guard_values, guard_index)
"""


def _dims(name: str) -> str:
    """Guard lines: ``{name}_rank`` and ``{name}_last4``, the last four dims of ``{name}_dims`` with missing leading
    dims as 1 (how a broadcasting mask is read)."""
    return (f"   {name}_rank = Size ({name}_dims)\n"
            f"   {name}_dims4 = Concat <axis: int = 0> (pad4, {name}_dims)\n"
            f"   {name}_last4 = Slice ({name}_dims4, minus4, big, axis_0)\n")


def _sparsify(x: str, name: str) -> str:
    """Body lines keeping the ``topk`` largest-magnitude features of ``x`` (zeros elsewhere) as ``{name}_sparse``;
    TopK breaks ties toward the lower index, as SFA requires."""
    return (f"   {name}_abs = Abs ({x})\n"
            f"   {name}_top, {name}_idx = TopK <axis: int = -1, largest: int = 1, sorted: int = 1> "
            f"({name}_abs, k_count)\n"
            f"   {name}_val = GatherElements <axis: int = -1> ({x}, {name}_idx)\n"
            f"   {name}_shape = Shape ({x})\n"
            f"   {name}_zeros = Expand (zero, {name}_shape)\n"
            f"   {name}_sparse = ScatterElements <axis: int = -1> ({name}_zeros, {name}_idx, {name}_val)\n")


def flash_sfa_function(opset: int):
    """The FunctionProto of com.sfa::FlashSFA for a model whose default-domain opset is ``opset``."""
    import onnx.parser

    header = (f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]>\n'
              f"{OP_NAME} <topk, scale, causal> (query, key, value, attn_mask) => (output, lse)\n")
    body = (_BODY.replace("{sparsify_q}", _sparsify("q", "q")).replace("{sparsify_k}", _sparsify("kf", "k"))
            .replace("{guard}", _GUARD.replace("{dims}", "".join(_dims(name) for name in "qkvm").rstrip("\n"))))
    function = onnx.parser.parse_function(header + body)
    next(n for n in function.node if list(n.output) == ["guard"]).name = GUARD_NODE
    return function


def _schema():
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    attr = defs.OpSchema.Attribute
    return defs.OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION, doc=__doc__,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"), param("attn_mask", "M")],
        outputs=[param("output", "T"), param("lse", "tensor(float)")],
        type_constraints=[("T", floats, "query, key, value and output"), ("M", floats, "additive mask")],
        attributes=[attr("topk", defs.OpSchema.AttrType.INT, "features kept per query/key row"),
                    attr("scale", defs.OpSchema.AttrType.FLOAT, "score scale"),
                    attr("causal", defs.OpSchema.AttrType.INT, "1: hide keys after each query row")],
    )


@contextlib.contextmanager
def registered_schema():
    """Make the FlashSFA schema known to onnx (and so to onnxscript) for the duration of an export only."""
    from onnx import defs

    try:
        defs.get_schema(OP_NAME, DOMAIN_VERSION, DOMAIN)
    except defs.SchemaError:
        pass
    else:  # registered by someone else: leave it alone
        yield
        return
    defs.register_schema(_schema())
    try:
        yield
    finally:
        defs.deregister_schema(OP_NAME, DOMAIN_VERSION, DOMAIN)
