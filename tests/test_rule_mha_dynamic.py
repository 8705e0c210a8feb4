"""ops/rules/computed_sizes: torch's nn.MultiheadAttention exported with a dynamic batch (and sequence) computes
every size of the attention from shapes (head_dim = E // heads read off its input, `bsz * num_heads` as
Mul(batch, 4)); the fixed sizes become constants and batch * heads -1, so the heads, the projection before
and the out projection are prunable as in the static export, with the same outputs at any batch and
sequence size; the targets the rule must leave. The models are tests/data/make_torch_mha.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import PruneConfig, inspect, prune
from onnxprune.loading import load
from onnxprune.ops.rules import simplify_model
from tests.builders import Builder, run
from tests.oracle import drop_every_other, zero_dropped

DATA = Path(__file__).parent / "data"
MODELS = {"batch": "torch_mha_dynamic.onnx", "batch_and_seq": "torch_mha_dynamic_seq.onnx"}
SIZES = {"batch": [(1, 10), (2, 10), (3, 10)], "batch_and_seq": [(1, 5), (2, 10), (3, 5), (3, 10)]}
ANALYSED = {"x": [1, 10, 16]}
HEADS, HEAD_DIM = 4, 8
QUERY_VIEW = "/attn/Reshape_3"  # q.view(tgt_len, bsz * num_heads, head_dim)


def torch_mha(name: str) -> onnx.ModelProto:
    return onnx.load(DATA / MODELS[name])


def feed(batch: int, seq: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch * 100 + seq).standard_normal((batch, seq, 16)).astype(np.float32)}


def target(model: onnx.ModelProto, reshape: str) -> list:
    """A Reshape's target: its Concat's pieces (constants as values, others by name), or the constant."""
    nodes = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.name == reshape]
    if node.input[1] in constants:
        return [[v] for v in constants[node.input[1]]]
    return [constants.get(piece, piece) for piece in nodes[node.input[1]].input]


def kept_heads(model: onnx.ModelProto) -> int:
    """The heads of the packed in_proj's weight ([E, 3 * heads * head_dim])."""
    (node,) = [n for n in model.graph.node if n.name == "/attn/MatMul"]
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    return weight.dims[1] // (3 * HEAD_DIM)


@pytest.mark.parametrize("name, batch, seq", [(n, b, s) for n, sizes in SIZES.items() for b, s in sizes])
def test_the_rewrite_has_the_same_outputs_at_any_size(name, batch, seq):
    model = torch_mha(name)
    loaded = load(model, ANALYSED, vetted=True, runs=False, simplify=False)  # its Constant nodes made initializers
    after, counts = simplify_model(loaded.model, loaded.shapes)
    assert counts["computed_sizes"] >= 3 and counts["packed_qkv"] == 3
    assert target(after, QUERY_VIEW)[1:] == [[-1], [HEAD_DIM]]
    np.testing.assert_allclose(run(after, feed(batch, seq))[0], run(model, feed(batch, seq))[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_heads_and_both_projections_are_prunable_as_in_the_static_export(name):
    found = inspect(torch_mha(name), ANALYSED)
    static = inspect(onnx.load(DATA / "torch_mha.onnx"))
    prunable = {g["sources"][0]: g["channels"] for g in found["groups"] if g["prunable"]}
    assert prunable == {"/proj/MatMul": 32, "/attn/MatMul": HEADS, "/attn/Gemm": 32}
    assert found["coverage"] == pytest.approx(static["coverage"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruning_dead_heads_and_channels_is_exact_at_every_size(name):
    """Zero a half of every group at batch 1, prune exactly those: the outputs hold at other sizes too."""
    zeroed, plan = zero_dropped(torch_mha(name), keep_fn=lambda a: drop_every_other(a, seed=1), input_shapes=ANALYSED)
    heads = next(g for g in plan.groups if g.channels == HEADS)
    assert len(heads.keep) < HEADS, "the oracle must drop a head"
    result = prune(zeroed, PruneConfig(plan=plan, input_shapes=ANALYSED))
    assert kept_heads(result.model) == len(heads.keep)
    for batch, seq in SIZES[name]:
        np.testing.assert_allclose(run(result.model, feed(batch, seq))[0], run(zeroed, feed(batch, seq))[0],
                                   rtol=1e-5, atol=1e-5)


def test_a_pruned_model_cuts_heads_and_runs_at_other_batches():
    result = prune(torch_mha("batch_and_seq"), PruneConfig(filters=0.5, scorer="l1", input_shapes=ANALYSED))
    assert kept_heads(result.model) < HEADS
    for batch, seq in ((1, 10), (3, 10), (3, 5)):
        assert run(result.model, feed(batch, seq))[0].shape == (batch, seq, 8)


def split_heads(factor: int = HEADS, lead: str = "shape", width: str = "projection") -> onnx.ModelProto:
    """x [S, B, 16] -> proj (16 -> 32) -> Reshape to [S, B * factor, head_dim] (torch's q.view), head_dim =
    E // 4 read off the projection's shape -> MatMul (8 -> 8). `factor` other than 4: [S, B * factor,
    head_dim, 4 // factor] (the Mul's constant not the head count); `lead` "minus": S as (S - 1) + 1
    (possibly negative); `width` "input": head_dim = 16 // 2 read off x (a graph input)."""
    b = Builder(seed=5)
    h = b.matmul("proj", "x", 16, 32)
    shape, input_shape = b.node("Shape", "shape", [h]), b.node("Shape", "input_shape", ["x"])

    def entry(name, source, index):
        return b.node("Gather", name, [source, b.const(f"{name}.index", index, np.int64)], axis=0)

    seq, batch, features = entry("seq", shape, 0), entry("batch", shape, 1), entry("features", shape, 2)
    head_dim = b.node("Div", "head_dim", [features, b.const("heads", HEADS, np.int64)])
    if width == "input":
        head_dim = b.node("Div", "half_input", [entry("input_features", input_shape, 2), b.const("two", 2, np.int64)])
    if lead == "minus":
        seq = b.node("Add", "seq_back", [b.node("Sub", "seq_minus", [seq, b.const("one", 1, np.int64)]), "one"])
    pieces = [seq, b.node("Mul", "batch_heads", [batch, b.const("factor", factor, np.int64)]), head_dim]
    axes = b.const("axes", [0], np.int64)
    pieces = [b.node("Unsqueeze", f"{p}_entry", [p, axes]) for p in pieces]
    if factor != HEADS:
        pieces.append(b.const("rest", [HEADS // factor], np.int64))
    h = b.node("Reshape", "split", [h, b.node("Concat", "split_target", pieces, axis=0)])
    b.output(b.matmul("head_proj", h, HEAD_DIM if factor == HEADS else HEADS // factor, 8))
    return b.model([("x", ["S", "B", 16])], outputs=[("y", None)], opset=17)


def simplified(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    return simplify_model(model, load(model, {"x": [6, 2, 16]}, vetted=True, runs=False, simplify=False).shapes)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    for seq, batch in ((6, 2), (3, 1), (5, 3)):
        data = {"x": np.random.default_rng(seq).standard_normal((seq, batch, 16)).astype(np.float32)}
        np.testing.assert_allclose(run(after, data)[0], run(before, data)[0], rtol=1e-6, atol=1e-6)


def test_batch_times_heads_becomes_minus_one_and_head_dim_a_constant():
    model = split_heads()
    after, counts = simplified(model)
    assert counts == {"computed_sizes": 1}
    assert target(after, "split")[1:] == [[-1], [HEAD_DIM]] and isinstance(target(after, "split")[0], str)
    assert_same_outputs(model, after)


@pytest.mark.parametrize("kwargs", [{"factor": 2}, {"lead": "minus"}],
                         ids=["a Mul constant that is not the head count", "an entry possibly negative"])
def test_near_misses_keep_their_computed_batch_entry(kwargs):
    """head_dim, fixed, still becomes a constant; the batch entry stays computed."""
    model = split_heads(**kwargs)
    after, counts = simplified(model)
    assert counts == {"computed_sizes": 1}
    pieces = target(after, "split")
    assert isinstance(pieces[1], str) and pieces[2] == [HEAD_DIM]
    assert_same_outputs(model, after)


def test_a_size_read_off_a_graph_input_is_left_read():
    """Pruning never changes a graph input's width: its read is left (and with it the batch entry, since
    head_dim is then not known to be fixed); the same read off the projection is made a constant."""
    assert simplified(split_heads())[1] == {"computed_sizes": 1}
    after, counts = simplified(split_heads(width="input"))
    assert counts == {} and all(isinstance(p, str) for p in target(after, "split"))


def test_a_dim_a_recorded_value_info_fixes_is_not_taken_as_fixed():
    """A model traced at S=5 and then given a dynamic S keeps value_info saying 5: the rule must infer the
    shapes itself, or it writes 5 into a target that then fails at S=7."""
    b = Builder(0)
    r = b.relu("relu", b.matmul("mm", "x", 8, 8))
    picked = [b.node("Unsqueeze", f"{name}_unsqueezed", [b.node("Gather", name, [b.node("Shape", f"{name}_shape", [t]),
                                                                                 b.const(f"{name}_axis", np.array(a), np.int64)]),
                                                          b.const(f"{name}_at", [0], np.int64)])
              for name, t, a in (("batch", "x", 0), ("seq", r, 1))]
    target = b.node("Concat", "target", [*picked, b.const("tail", [1, 8], np.int64)], axis=0)
    split = b.node("Reshape", "split", [r, target])  # [N, S, 1, 8]
    merged = b.node("Reshape", "merge", [split, b.const("back", [0, 0, 8], np.int64)])
    b.output(b.matmul("mm2", merged, 8, 4), "y")
    model = b.model([("x", ["N", "S", 8])], outputs=[("y", ["N", "S", 4])])
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, ["N", 5, 8]))
    result = prune(model, PruneConfig(filters=0.5, scorer="l1", input_shapes={"x": [1, 5, 8]}))
    feed = {"x": np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)}
    assert run(result.model, feed)[0].shape == (2, 7, 4)
