"""ops/rules/inferred_merge: a Reshape merging attention heads back with its merged size read off another
tensor's shape (torchvision's Swin: ``x.reshape(B, N, C)``, C the block's hidden size) gets -1 there;
the same outputs at every batch size, the heads then prunable exactly (the oracle), and the targets it
must leave."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import PruneConfig, inspect, prune
from onnxprune.loading import load
from onnxprune.ops.rules import simplify_model
from tests.builders import Builder, random_input, run
from tests.oracle import assert_left_whole, drop_every_other, family_tests, zero_dropped

SEQ, HIDDEN, HEADS = 6, 16, 4
HEAD_DIM = HIDDEN // HEADS
REASON = "target shape is computed and its channel entry is not a constant"


def _entry(b: Builder, name: str, shape: str, index: int) -> str:
    """Shape[index] as a 1-element vector (Gather -> Unsqueeze), as torch exports ``x.size(index)``."""
    dim = b.node("Gather", f"{name}_gather", [shape, b.const(f"{name}.index", index, np.int64)], axis=0)
    return b.node("Unsqueeze", f"{name}_unsqueeze", [dim, b.const(f"{name}.axes", [0], np.int64)])


def window_attention(batch="B", lead: str = "shape", merge: str = "merge", allowzero: int = 0) -> onnx.ModelProto:
    """torchvision's shifted_window_attention without the windows: x [B, S, 16] -> qkv -> Reshape to
    [B, S, 3, 4, C // 4] (C = Shape(x)[2]) -> Transpose(2, 0, 3, 1, 4) -> Gather q, k, v -> scaled scores
    + a relative position bias [4, S, S] -> Softmax -> context -> Transpose(0, 2, 1, 3) -> Reshape to
    [B, S, C] -> proj. `lead`: the merge's leading entries from Shape(x) ("shape"), one of them minus 1
    ("minus": possibly negative) or cast through int8 ("int8": may wrap); `merge`: "merge" or "split" ([B, S, 16] -> [B, S, 4, C // 4] after the
    proj instead, a split the rule leaves); `allowzero` of the merge."""
    b = Builder(seed=11)
    qkv = b.add_bias("qkv_bias", b.matmul("qkv", "x", HIDDEN, 3 * HIDDEN), 3 * HIDDEN)
    shape = b.node("Shape", "shape", ["x"])
    batch_entry, seq_entry, hidden = (_entry(b, name, shape, i) for i, name in enumerate(("batch", "seq", "hidden")))
    head_dim = b.node("Div", "head_dim", [hidden, b.const("heads", [HEADS], np.int64)])
    split = b.node("Concat", "split_target", [batch_entry, seq_entry, b.const("qkv_heads", [3, HEADS], np.int64), head_dim],
                   axis=0)
    heads = b.node("Transpose", "qkv_t", [b.node("Reshape", "split", [qkv, split])], perm=[2, 0, 3, 1, 4])
    q, k, v = (b.node("Gather", f"pick_{n}", [heads, b.const(f"index_{n}", i, np.int64)], axis=0)
               for i, n in enumerate("qkv"))
    q = b.node("Mul", "scale", [q, b.const("scale.value", HEAD_DIM ** -0.5)])
    scores = b.node("MatMul", "scores", [q, b.node("Transpose", "k_t", [k], perm=[0, 1, 3, 2])])
    scores = b.node("Add", "position_bias", [scores, b.randn("bias_table", [HEADS, SEQ, SEQ], 0.5)])
    context = b.node("MatMul", "context", [b.node("Softmax", "softmax", [scores], axis=-1), v])
    context = b.node("Transpose", "context_t", [context], perm=[0, 2, 1, 3])
    if lead == "minus":
        batch_entry = b.node("Sub", "batch_minus", [batch_entry, b.const("one", [1], np.int64)])
        batch_entry = b.node("Add", "batch_back", [batch_entry, "one"])
    if lead == "int8":  # through 8 bits: a size of 128 or more would wrap negative
        narrow = b.node("Cast", "batch_int8", [batch_entry], to=onnx.TensorProto.INT8)
        batch_entry = b.node("Cast", "batch_int64", [narrow], to=onnx.TensorProto.INT64)
    if merge == "merge":
        target = b.node("Concat", "merge_target", [batch_entry, seq_entry, hidden], axis=0)
        merged = b.node("Reshape", "merge", [context, target], allowzero=allowzero)
        b.output(b.add_bias("proj_bias", b.matmul("proj", merged, HIDDEN, HIDDEN), HIDDEN))
    else:  # constant merge, then a split of the proj's output whose last entry is computed
        merged = b.node("Reshape", "merge", [context, b.const("merge_target", [0, 0, HIDDEN], np.int64)])
        out = b.add_bias("proj_bias", b.matmul("proj", merged, HIDDEN, HIDDEN), HIDDEN)
        target = b.node("Concat", "split_heads", [batch_entry, seq_entry, b.const("heads4", [HEADS], np.int64), head_dim],
                        axis=0)
        b.output(b.node("Reshape", "unmerge", [out, target]))
    return b.model([("x", [batch, SEQ, HIDDEN])], outputs=[("y", None)], opset=17)


def static_window_attention() -> onnx.ModelProto:
    return window_attention(batch=2)


test_pruning_dead_heads_behind_an_inferred_merge_is_exact, _ = family_tests(
    {"window_attention": static_window_attention}, {})


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def merge_target(model: onnx.ModelProto) -> list:
    """The merge Reshape's target: its Concat's pieces, constants as values, others by name."""
    nodes = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    (merge,) = [n for n in model.graph.node if n.name == "merge"]
    return [constants.get(piece, piece) for piece in nodes[merge.input[1]].input]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_the_merged_size_is_inferred_with_the_same_outputs_at_any_batch(batch):
    model = window_attention()
    after, counts = simplify_model(model, load(model, {"x": [2, SEQ, HIDDEN]}, vetted=True, runs=False).shapes)
    assert counts == {"inferred_merge": 1}
    assert merge_target(after)[-1] == [-1]
    feed = {"x": np.random.default_rng(batch).standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}
    np.testing.assert_allclose(run(after, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)


def test_without_the_rule_the_heads_are_left_whole():
    assert_left_whole(static_window_attention(), REASON, simplify=False)


def test_the_heads_are_one_prunable_group_after_loading():
    (group,) = [g for g in inspect(static_window_attention())["groups"] if g["prunable"]]
    assert group["channels"] == HEADS and group["sources"] == ["qkv"]


def test_a_pruned_model_with_a_dynamic_batch_holds_at_other_batches():
    """Zero a half of the heads at batch 2, prune them: outputs unchanged at batch 1 and 3 too."""
    zeroed, plan = zero_dropped(window_attention(), keep_fn=drop_every_other, input_shapes={"x": [2, SEQ, HIDDEN]})
    assert merge_target(zeroed)[-1] == [-1]  # the model the analysis saw, rewritten
    result = prune(zeroed, PruneConfig(plan=plan, input_shapes={"x": [2, SEQ, HIDDEN]}))
    assert [g.keep for g in plan.groups if g.keep != list(range(g.channels))], "the oracle must drop a head"
    for batch in (1, 3):
        feed = {"x": np.random.default_rng(batch).standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}
        np.testing.assert_allclose(run(result.model, feed)[0], run(zeroed, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"lead": "minus"}, {"lead": "int8"}, {"merge": "split"}, {"allowzero": 1}],
                         ids=["an entry possibly negative", "an entry cast through 8 bits", "a split", "allowzero"])
def test_targets_the_rule_must_leave(kwargs):
    model = window_attention(batch=2, **kwargs)
    after, counts = simplify_model(model, load(model, vetted=True, runs=False).shapes)
    assert counts == {} and ops(after) == ops(model)
    feed = random_input(model)
    np.testing.assert_allclose(run(after, feed)[0], run(model, feed)[0])
