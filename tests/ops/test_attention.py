"""Multi-head attention as exporters write it: heads are units of head_dim channels shared by the Q, K
and V projections' output columns and the output projection's input rows; the Reshapes' head count
shrinks with them. Variants: the scale on Q or on the scores, K pre-transposed, Gemm projections, a
fused QKV projection split three ways or reshaped to [B, S, 3, heads, head_dim] and taken apart, Reshape
targets computed by Shape/Gather/Concat, opsets 11-18 (and 23 for ONNX's own Attention).
Grouped-query attention (K/V heads repeated by Expand for several Q heads): a unit is a K/V head and
the Q heads that share it. ONNX's own Attention (opset 23) on [B, S, features] and [B, heads, S, size]."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
import pytest

from onnxprune import PruneConfig, inspect, prune
from onnxprune.allocate import keep_counts
from onnxprune.loading import load
from onnxprune.plan import Plan
from onnxprune.stages import analyze_model
from onnxprune.validate.cost import model_cost, node_macs
from tests.builders import Builder, random_input, run
from tests.oracle import family_tests

SEQ, HEADS, HEAD_DIM = 5, 4, 8
HIDDEN = HEADS * HEAD_DIM


class AttentionBuilder(Builder):
    """A Builder with the pieces of an exported attention block over x [1, SEQ, HIDDEN]."""

    def __init__(self, seed: int, opset: int, gemm: bool, computed: bool):
        super().__init__(seed, opset=opset)
        self.gemm, self.computed = gemm, computed

    def linear(self, name: str, x: str, n: int) -> str:
        """x @ W + b: Gemm(transB) on 2-D rows, or MatMul then Add."""
        if self.gemm:
            weight = self.randn(f"{name}.weight", [n, HIDDEN], 1 / math.sqrt(HIDDEN))
            return self.node("Gemm", name, [x, weight, self.randn(f"{name}.bias", [n], 0.1)], transB=1)
        return self.add_bias(f"{name}_bias", self.matmul(name, x, HIDDEN, n), n)

    def reshape(self, name: str, x: str, dims: list[int]) -> str:
        """Reshape to [1, SEQ, *dims]: a literal target, or one built from Shape(x) as torch exports it."""
        if not self.computed:
            return self.node("Reshape", name, [x, self.const(f"{name}.shape", [0, 0, *dims] if not self.gemm
                                                              else [1, SEQ, *dims], np.int64)])
        pieces = [self._dim(name, x, i) for i in (0, 1)]
        target = self.node("Concat", f"{name}_target", pieces + [self.const(f"{name}.dims", dims, np.int64)], axis=0)
        return self.node("Reshape", name, [x, target])

    def _dim(self, name: str, x: str, index: int) -> str:
        """Shape(x)[index] as a 1-element vector (Shape -> Gather -> Unsqueeze)."""
        shape = self.node("Shape", f"{name}_shape{index}", [x])
        dim = self.node("Gather", f"{name}_gather{index}", [shape, self.const(f"{name}.index{index}", index, np.int64)],
                        axis=0)
        if self.opset >= 13:
            return self.node("Unsqueeze", f"{name}_unsqueeze{index}", [dim, self.const(f"{name}.axes{index}", [0], np.int64)])
        return self.node("Unsqueeze", f"{name}_unsqueeze{index}", [dim], axes=[0])


def packed_heads(b: AttentionBuilder, qkv: str, gather: bool) -> list[str]:
    """[B, S, 3*32] -> Reshape [B, S, 3, 4, 8] -> Transpose(2,0,3,1,4) -> Slice and Squeeze axis 0
    three times (PaddlePaddle's spelling), or Gather index i on axis 0 (torch's ``qkv[i]``): Q, K, V as
    [B, 4, S, 8]."""
    heads = b.node("Transpose", "qkv_t", [b.reshape("qkv_heads", qkv, [3, HEADS, HEAD_DIM])], perm=[2, 0, 3, 1, 4])
    if gather:
        return [b.node("Gather", f"{name}_t", [heads, b.const(f"{name}_t.index", i, np.int64)], axis=0)
                for i, name in enumerate("qkv")]
    parts = []
    for i, name in enumerate("qkv"):
        bounds = [b.const(f"{name}_slice.{key}", [value], np.int64) for key, value in (("starts", i), ("ends", i + 1),
                                                                                     ("axes", 0))]
        part = b.node("Slice", f"{name}_slice", [heads, *bounds])
        parts.append(b.node("Squeeze", f"{name}_t", [part, b.const(f"{name}_t.axes", [0], np.int64)]))
    return parts


def attention(seed: int = 0, *, opset: int = 17, scale_on_q: bool = False, k_transposed: bool = False,
              gemm: bool = False, fused_qkv: bool = False, computed: bool = False, packed: bool = False,
              gather: bool = False):
    """x [1,5,32] (Gemm: reshaped to [5,32]) -> q, k, v projections (32->32) -> Reshape [B,S,4,8] -> Transpose to
    [B,4,S,8] (K to [B,4,8,S]: by a second Transpose, or pre-transposed by one) -> scores Q K^T -> scaled
    by 1/sqrt(8) (on the scores, or on Q) -> + mask -> Softmax -> context with V -> Transpose back ->
    Reshape [B,S,32] -> out projection (32->32) -> y. fused_qkv: one projection (32->96) split in three.

    packed: the fused projection reshaped to [B, S, 3, 4, 8] and taken apart after a Transpose (see
    `packed_heads`; gather: by Gather), the scale on Q.

    Prunable: the 4 heads (units of 8 channels of q, k and v, and 8 input rows of out).
    """
    b = AttentionBuilder(seed, opset, gemm, computed)
    x = b.node("Reshape", "rows", ["x", b.const("rows.shape", [SEQ, HIDDEN], np.int64)]) if gemm else "x"
    if packed:
        q, k, v = packed_heads(b, b.linear("qkv", x, 3 * HIDDEN), gather)
        q = b.node("Mul", "scale", [q, b.const("scale.value", 1 / math.sqrt(HEAD_DIM))])
        k = b.node("Transpose", "k_tt", [k], perm=[0, 1, 3, 2])
        return _attend(b, q, k, v, scaled=True, gemm=gemm)
    if fused_qkv:
        qkv = b.linear("qkv", x, 3 * HIDDEN)
        if opset >= 18:
            q, k, v = b.node("Split", "split_qkv", [qkv], n_out=3, axis=-1, num_outputs=3)
        else:
            q, k, v = b.node("Split", "split_qkv", [qkv, b.const("split_qkv.split", [HIDDEN] * 3, np.int64)],
                             n_out=3, axis=-1)
    else:
        q, k, v = (b.linear(name, x, HIDDEN) for name in ("q", "k", "v"))
    if scale_on_q:
        q = b.node("Mul", "scale", [q, b.const("scale.value", 1 / math.sqrt(HEAD_DIM))])
    heads = [b.reshape(f"{name}_heads", t, [HEADS, HEAD_DIM]) for name, t in (("q", q), ("k", k), ("v", v))]
    q, k, v = (b.node("Transpose", f"{name}_t", [t], perm=[0, 2, 1, 3]) for name, t in zip("qkv", heads))
    if k_transposed:
        k = b.node("Transpose", "k_tt", [heads[1]], perm=[0, 2, 3, 1])
    else:
        k = b.node("Transpose", "k_tt", [k], perm=[0, 1, 3, 2])
    return _attend(b, q, k, v, scaled=scale_on_q, gemm=gemm)


def _attend(b: AttentionBuilder, q: str, k: str, v: str, scaled: bool, gemm: bool):
    """Q [B,4,S,8], K^T [B,4,8,S], V [B,4,S,8] -> scores (scaled unless `scaled`), mask, Softmax, context,
    heads merged back -> out projection = y."""
    scores = b.node("MatMul", "scores", [q, k])
    if not scaled:
        scores = b.node("Div", "scale", [scores, b.const("scale.value", math.sqrt(HEAD_DIM))])
    mask = b.const("mask", np.where(np.arange(SEQ) < SEQ - 1, 0.0, -1e4).reshape(1, 1, 1, SEQ))
    probs = b.node("Softmax", "softmax", [b.node("Add", "masked", [scores, mask])], axis=-1)
    context = b.node("Transpose", "context_t", [b.node("MatMul", "context", [probs, v])], perm=[0, 2, 1, 3])
    merged = b.reshape("merge_heads", context, [HIDDEN]) if not gemm else \
        b.node("Reshape", "merge_heads", [context, b.const("merge_heads.shape", [SEQ, HIDDEN], np.int64)])
    b.output(b.linear("out", merged, HIDDEN))
    return b.model([("x", [1, SEQ, HIDDEN])], name="attention")


def grouped_query(seed: int = 0, computed: bool = False):
    """Grouped-query attention: q (32->32, 4 heads), k and v (32->16, 2 heads each, repeated twice by
    Unsqueeze -> Expand -> Reshape, as repeat_kv exports) -> scores, Softmax, context -> out (32->32).

    Prunable: 2 units, each a K/V head and the 2 Q heads that share it (the Expand's and the Reshapes'
    head counts shrink together). computed: the shapes built by Shape/Gather/Concat.
    """
    b = AttentionBuilder(seed, 17, gemm=False, computed=computed)
    q = b.node("Transpose", "q_t", [b.reshape("q_heads", b.linear("q", "x", HIDDEN), [HEADS, HEAD_DIM])],
               perm=[0, 2, 1, 3])
    shared = []
    for name in ("k", "v"):
        h = b.reshape(f"{name}_heads", b.add_bias(f"{name}_bias", b.matmul(name, "x", HIDDEN, HIDDEN // 2), HIDDEN // 2),
                      [HEADS // 2, HEAD_DIM])
        h = b.node("Unsqueeze", f"{name}_unsqueeze", [b.node("Transpose", f"{name}_t", [h], perm=[0, 2, 1, 3]),
                                                      b.const(f"{name}.axes", [2], np.int64)])
        dims = [HEADS // 2, 2, SEQ, HEAD_DIM]
        repeat = b.node("Concat", f"{name}_repeat_shape", [b._dim(f"{name}_repeat", h, 0), b.const(
            f"{name}.repeat", dims, np.int64)], axis=0) if computed else b.const(f"{name}.repeat", [1, *dims], np.int64)
        h = b.node("Expand", f"{name}_repeat", [h, repeat])
        shared.append(b.node("Reshape", f"{name}_shared", [h, b.const(f"{name}.shared", [1, HEADS, SEQ, HEAD_DIM], np.int64)]))
    k = b.node("Transpose", "k_tt", [shared[0]], perm=[0, 1, 3, 2])
    probs = b.node("Softmax", "softmax", [b.node("MatMul", "scores", [q, k])], axis=-1)
    context = b.node("Transpose", "context_t", [b.node("MatMul", "context", [probs, shared[1]])], perm=[0, 2, 1, 3])
    b.output(b.linear("out", b.reshape("merge_heads", context, [HIDDEN]), HIDDEN))
    return b.model([("x", [1, SEQ, HIDDEN])], name="grouped_query")


def onnx_attention(seed: int = 0, kv_heads: int = HEADS, four_d: bool = False, mask_input: bool = False,
                   present: bool = False):
    """ONNX's own Attention (opset 23): x [1,5,32] -> q (32->32), k and v (32->8*kv_heads) -> Attention
    (with a constant per-head mask [4, 5, 5]) on [B, S, features] with q_num_heads 4 and kv_num_heads,
    or (four_d) on [B, heads, S, 8] after Reshape and Transpose -> out (32->32).

    Prunable: the K/V heads, each with the Q heads that share it (4 // kv_heads of them). Blocked:
    mask_input (the per-head mask is a model input), present (its present key is a model output).
    """
    b = AttentionBuilder(seed, 23, gemm=False, computed=False)
    widths = {"q": HIDDEN, "k": kv_heads * HEAD_DIM, "v": kv_heads * HEAD_DIM}
    q, k, v = (b.add_bias(f"{name}_bias", b.matmul(name, "x", HIDDEN, n), n) for name, n in widths.items())
    mask = "mask" if mask_input else b.randn("mask", [HEADS, SEQ, SEQ], 0.5)
    inputs = [("x", [1, SEQ, HIDDEN])] + ([("mask", [1, HEADS, SEQ, SEQ])] if mask_input else [])
    if present:
        h, key = b.node("Attention", "attention", [q, k, v, mask], n_out=2, q_num_heads=HEADS, kv_num_heads=kv_heads)
        b.output(b.linear("out", h, HIDDEN))
        b.output(key, "present_key")
        return b.model(inputs, outputs=[("y", [1, SEQ, HIDDEN]), ("present_key", [1, kv_heads, SEQ, HEAD_DIM])],
                       name="onnx_attention")
    if not four_d:
        h = b.node("Attention", "attention", [q, k, v, mask], q_num_heads=HEADS, kv_num_heads=kv_heads)
    else:
        q, k, v = (b.node("Transpose", f"{name}_t", [b.reshape(f"{name}_heads", t, [n // HEAD_DIM, HEAD_DIM])],
                          perm=[0, 2, 1, 3]) for (name, n), t in zip(widths.items(), (q, k, v)))
        h = b.node("Attention", "attention", [q, k, v, mask])
        h = b.reshape("merge_heads", b.node("Transpose", "context_t", [h], perm=[0, 2, 1, 3]), [HIDDEN])
    b.output(b.linear("out", h, HIDDEN))
    return b.model(inputs, name="onnx_attention")


def _variant(**options):
    return lambda seed=0: attention(seed, **options)


BUILDERS = {
    "attention": attention,
    "attention_scale_on_q": _variant(scale_on_q=True),
    "attention_k_pretransposed": _variant(k_transposed=True),
    "attention_gemm": _variant(gemm=True),
    "attention_fused_qkv": _variant(fused_qkv=True),
    "attention_fused_qkv_opset18": _variant(fused_qkv=True, opset=18),
    "attention_computed_shapes": _variant(computed=True),
    "attention_computed_shapes_opset13": _variant(computed=True, opset=13, k_transposed=True),
    "attention_computed_shapes_opset11": _variant(computed=True, opset=11),
    "attention_packed_heads": _variant(packed=True),
    "attention_packed_heads_computed": _variant(packed=True, computed=True),
    "attention_packed_heads_gather": _variant(packed=True, gather=True),
    "grouped_query": grouped_query,
    "grouped_query_computed_shapes": lambda seed=0: grouped_query(seed, computed=True),
    "onnx_attention": onnx_attention,
    "onnx_attention_grouped_query": lambda seed=0: onnx_attention(seed, kv_heads=2),
    "onnx_attention_4d": lambda seed=0: onnx_attention(seed, four_d=True),
    "onnx_attention_4d_grouped_query": lambda seed=0: onnx_attention(seed, kv_heads=2, four_d=True),
}
BLOCKED_BUILDERS = {
    "blocked_onnx_attention_mask_input": lambda seed=0: onnx_attention(seed, mask_input=True),
    "blocked_onnx_attention_present": lambda seed=0: onnx_attention(seed, present=True),
}
BLOCKED = {
    "blocked_onnx_attention_mask_input": "ONNX Attention: a computed mask over the heads",
    "blocked_onnx_attention_present": "past keys and values, or its present or QK outputs, are used",
}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS | BLOCKED_BUILDERS, BLOCKED)


TORCH_MHA = Path(__file__).parents[1] / "data" / "torch_mha.onnx"


def torch_packed_attention(seed: int = 0) -> onnx.ModelProto:
    """torch's nn.MultiheadAttention between two Linear layers as torch.onnx exports it
    (tests/data/make_torch_mha.py): its packed Q/K/V reshaped to [S, B, 3, E] and picked apart by Gathers,
    which loading makes Slices (ops/rules/packed_qkv.py). Prunable: the 4 heads, proj's and out_proj's 32."""
    return onnx.load(TORCH_MHA)


test_pruning_dead_heads_of_torch_attention_is_exact, _ = family_tests({"torch_packed_attention": torch_packed_attention}, {})


def test_torch_attention_heads_are_units_with_their_q_k_and_v():
    groups = {tuple(g["sources"]): g for g in inspect(torch_packed_attention())["groups"]}
    heads = groups[("/attn/MatMul",)]
    assert heads["prunable"] and heads["channels"] == 4
    result = prune(torch_packed_attention(), PruneConfig(filters=0.5, scorer="l1"))
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights["onnx::MatMul_158"].shape == (16, 48)  # [proj, q | k | v] of the 2 heads kept
    assert run(result.model, random_input(result.model))[0].shape == (1, 10, 8)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_heads_are_the_units_of_one_group(name):
    (group,) = [g for g in inspect(BUILDERS[name]())["groups"] if g["prunable"]]
    assert group["channels"] == (HEADS // 2 if "grouped_query" in name else HEADS)
    expected = ["qkv"] if "fused" in name or "packed" in name else ["q", "k", "v"]
    assert group["sources"] == expected


def test_a_head_whose_value_columns_are_zero_is_removed_exactly():
    """The issue's oracle: zero head 2's V columns and V bias; outputs do not change without that head."""
    model = attention(seed=3)
    loaded = load(model)
    analysis = analyze_model(loaded)
    nodes = {n.name: n for n in analysis.graph.nodes}
    columns = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
    for node, index in ((nodes["v"], 1), (nodes["v_bias"], 1)):
        values = node.inputs[index].values.copy()
        values[..., columns] = 0
        node.inputs[index] = gs.Constant(node.inputs[index].name + "_zeroed", values)
    (group,) = analysis.prunable_groups()
    plan = Plan.from_keep(analysis, {group.index: np.array([0, 1, 3])})
    zeroed = gs.export_onnx(analysis.graph)
    zeroed.ir_version = loaded.model.ir_version
    result = prune(zeroed, PruneConfig(plan=plan))
    feed = random_input(zeroed)
    np.testing.assert_allclose(run(result.model, feed)[0], run(zeroed, feed)[0], rtol=1e-5, atol=1e-5)
    reshapes = {n.name: n for n in result.model.graph.node if n.op_type == "Reshape"}
    assert set(reshapes) == {"q_heads", "k_heads", "v_heads", "merge_heads"}


def test_the_score_and_context_products_count_in_the_cost():
    full = model_cost(attention(), {"x": [1, SEQ, HIDDEN]})["macs"]
    result = prune(attention(), PruneConfig(filters=0.5))
    after = result.report["after"]["macs"]
    projections = 4 * SEQ * HIDDEN * HIDDEN  # q, k, v, out at full size
    products = 2 * HEADS * SEQ * SEQ * HEAD_DIM  # scores and context
    elementwise = 3 * SEQ * HIDDEN + 3 * HEADS * SEQ * SEQ + SEQ * HIDDEN  # biases, scale/mask/softmax, out bias
    assert full == projections + products + elementwise
    assert after == projections // 2 + products // 2 + (3 * SEQ * HIDDEN + 3 * HEADS * SEQ * SEQ) // 2 + SEQ * HIDDEN


def _with_dead_head(head: int):
    """The attention builder with head `head`'s V columns and V bias zero: its context is zero."""
    model = attention(seed=4)
    for tensor in model.graph.initializer:
        if tensor.name in ("v.weight", "v_bias.bias"):
            values = numpy_helper.to_array(tensor).copy()
            values[..., head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


@pytest.mark.parametrize("scorer", ["activation", "wanda", "pfp", "obs"])
def test_data_informed_scorers_remove_the_head_that_contributes_nothing(scorer):
    """Head importance from calibration data (what the output projection receives from each head)."""
    calibration = {"x": np.random.default_rng(0).standard_normal((32, SEQ, HIDDEN)).astype(np.float32)}
    config = PruneConfig(filters=0.25, round_to=1, scorer=scorer, calibration=calibration, recover="none")
    result = prune(_with_dead_head(1), config)
    (group,) = result.plan.groups
    assert group.keep == [0, 2, 3]
    assert result.report["fidelity"]["max_abs_diff"] < 1e-5


def test_round_to_counts_the_channels_of_a_head():
    """--round-to 8 keeps heads of 8 channels at any count (it used to round 4 heads up to all 4)."""
    analysis = analyze_model(load(attention()))
    (group,) = analysis.prunable_groups()
    assert group.width == HEAD_DIM
    scores = {group.index: np.arange(HEADS, dtype=float)}
    assert keep_counts(analysis, scores, 0.3, False, round_to=8) == {group.index: 3}


def test_onnx_attention_macs_are_the_scores_and_the_context():
    shapes = {"q": (1, SEQ, HIDDEN), "k": (1, SEQ, HIDDEN // 2), "y": (1, SEQ, HIDDEN)}
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=HEADS, kv_num_heads=HEADS // 2)
    assert node_macs(node, shapes, {}) == 2 * HEADS * SEQ * SEQ * HEAD_DIM


def test_the_output_projection_is_refitted_after_heads_are_removed():
    calibration = {"x": np.random.default_rng(0).standard_normal((64, SEQ, HIDDEN)).astype(np.float32)}
    report = prune(attention(), PruneConfig(filters=0.5, calibration=calibration, recover="lstsq")).report
    (layer,) = report["recovery"]["layers"]
    assert (layer["name"], layer["status"]) == ("out", "recovered")
    assert layer["error_after"] < layer["error_before"]
