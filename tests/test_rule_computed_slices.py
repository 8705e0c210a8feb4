"""ops/rules/computed_slices: torch's `in_proj_weight.split([E, 2 * E])` (nn.MultiheadAttention's cross-attention,
the query projected apart from the memory's key and value) exported with a dynamic axis slices the packed
weight and bias with bounds added up from E read off a shape. The bounds, fixed at any size, become
constants, so the slices fold into constant weights and the projections feeding them are prunable; a bound
that varies with the input is left read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import PruneConfig, inspect, prune
from onnxprune.loading import load
from onnxprune.ops.rules import simplify_model
from tests.builders import Builder, run
from tests.oracle import drop_every_other, zero_dropped

ANALYSED = {"x": [6, 2, 16]}
SIZES = [(6, 2), (3, 1), (5, 3), (9, 1)]  # (sequence, batch)
WIDTH = 32  # E


def split_projection(varying: bool = False) -> onnx.ModelProto:
    """x [S, B, 16] -> proj (16 -> E) -> q = proj @ W[:E].T + b[:E], kv = proj @ W[E:3E].T, E read off proj's
    shape (fixed: its last dim) -> y = relu(q) @ Wo + relu(kv) @ Wkv_o. `varying`: also y + x[:S // 2] summed
    over the sequence, a Slice whose end varies with the input."""
    b = Builder(seed=3)
    h = b.matmul("proj", "x", 16, WIDTH)
    axes = b.const("axes", [0], np.int64)
    width = b.node("Unsqueeze", "width", [b.node("Gather", "features", [b.node("Shape", "shape", [h]),
                                                                           b.const("last", 2, np.int64)], axis=0), axes])
    zero = b.const("zero", [0], np.int64)
    q_end = b.node("Add", "q_end", [zero, width])
    kv_end = b.node("Add", "kv_end", [q_end, b.node("Mul", "kv_width", [width, b.const("two", [2], np.int64)])])
    weight, bias = b.randn("in_proj_weight", [3 * WIDTH, WIDTH], 0.2), b.randn("in_proj_bias", [3 * WIDTH], 0.1)
    q_weight = b.node("Transpose", "q_weight", [b.node("Slice", "q_slice", [weight, zero, q_end, axes])], perm=[1, 0])
    kv_weight = b.node("Transpose", "kv_weight", [b.node("Slice", "kv_slice", [weight, q_end, kv_end, axes])], perm=[1, 0])
    q = b.node("Add", "q", [b.node("MatMul", "q_proj", [h, q_weight]), b.node("Slice", "q_bias", [bias, zero, q_end, axes])])
    kv = b.node("MatMul", "kv_proj", [h, kv_weight])
    y = b.node("Add", "sum", [b.matmul("q_out", b.relu("q_act", q), WIDTH, 8),
                              b.matmul("kv_out", b.relu("kv_act", kv), 2 * WIDTH, 8)])
    if varying:
        seq = b.node("Gather", "seq", [b.node("Shape", "input_shape", ["x"]), b.const("first", 0, np.int64)], axis=0)
        half = b.node("Unsqueeze", "half", [b.node("Div", "halve", [seq, b.const("two_", 2, np.int64)]), axes])
        head = b.node("Slice", "head", [b.matmul("x_proj", "x", 16, 8), zero, half, axes])
        y = b.node("Add", "with_head", [y, b.node("ReduceSum", "head_sum", [head, axes], keepdims=1)])
    b.output(y)
    return b.model([("x", ["S", "B", 16])], outputs=[("y", None)], opset=17)


def feed(seq: int, batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seq * 10 + batch).standard_normal((seq, batch, 16)).astype(np.float32)}


def simplified(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return simplify_model(model, load(model, ANALYSED, vetted=True, runs=False, simplify=False).shapes)


def slice_bounds(model: onnx.ModelProto, name: str) -> list:
    """The bounds of Slice `name`: constant values, or the name of a computed bound."""
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.name == name]
    return [constants.get(bound, bound) for bound in node.input[1:]]


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray | None:
    """Input `index` of node `node_name` when it is an initializer, else None."""
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.name == node_name]
    return constants.get(node.input[index])


def test_the_split_bounds_become_constants_and_the_slices_constant_weights():
    model = split_projection()
    after, counts = simplified(model)
    assert counts.get("computed_slices") == 3
    packed, bias = weight(model, "q_slice", 0), weight(model, "q_bias", 0)
    assert not [n for n in after.graph.node if n.op_type == "Slice"]
    np.testing.assert_array_equal(weight(after, "q_proj"), packed[:WIDTH].T)
    np.testing.assert_array_equal(weight(after, "kv_proj"), packed[WIDTH:].T)
    np.testing.assert_array_equal(weight(after, "q", 1), bias[:WIDTH])
    for seq, batch in SIZES:
        np.testing.assert_allclose(run(after, feed(seq, batch))[0], run(model, feed(seq, batch))[0], rtol=1e-6, atol=1e-6)


def test_a_bound_that_varies_with_the_input_is_left_read():
    model = split_projection(varying=True)
    after, counts = simplified(model)
    assert counts.get("computed_slices") == 3  # the split's, not x[:S // 2]
    assert slice_bounds(after, "head")[1] == "half_out"
    for seq, batch in SIZES:
        np.testing.assert_allclose(run(after, feed(seq, batch))[0], run(model, feed(seq, batch))[0], rtol=1e-6, atol=1e-6)


def test_the_projection_before_the_split_weight_is_prunable():
    groups = {g["sources"][0]: (g["channels"], g["prunable"]) for g in inspect(split_projection(), ANALYSED)["groups"]}
    assert groups["proj"] == (WIDTH, True)
    assert groups["q_proj"] == (WIDTH, True) and groups["kv_proj"] == (2 * WIDTH, True)


@pytest.mark.parametrize("seed", [0, 1])
def test_pruning_dead_channels_is_exact_at_every_size(seed):
    model = split_projection()
    zeroed, plan = zero_dropped(model, keep_fn=lambda a: drop_every_other(a, seed), input_shapes=ANALYSED)
    assert sorted(g.channels for g in plan.groups if len(g.keep) < g.channels) == [WIDTH, WIDTH, 2 * WIDTH]
    result = prune(zeroed, PruneConfig(plan=plan, input_shapes=ANALYSED))
    assert result.report["after"]["params"] < result.report["before"]["params"]
    for seq, batch in SIZES:
        np.testing.assert_allclose(run(result.model, feed(seq, batch))[0], run(zeroed, feed(seq, batch))[0],
                                   rtol=1e-5, atol=1e-5)
