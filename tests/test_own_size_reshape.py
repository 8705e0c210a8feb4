"""ops/layout: a Reshape whose target entry at the output's channel axis copies its own input's size there
(HF GPT-2's Conv1D: `x.view(-1, x.size(-1))`; ViT's `flatten(2)`: `x.view(x.shape[:2] + (-1,))`) follows
the kept count at any size, so the Shape read is harmless and the entry stays computed; the near misses
(the size of another tensor, the size of another axis, the count copied to another entry) block, saying
why. Analysed at batch 1, checked at other batch and sequence sizes; the rules of ops/rules are off
(`simplify=False`): what is tested is the handlers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune import PruneConfig, inspect, prune
from tests.builders import Builder, run
from tests.oracle import drop_every_other, zero_dropped

SEQ_SHAPES = {"x": [1, 5, 16]}
IMAGE_SHAPES = {"x": [1, 3, 8, 8]}


def _entry(b: Builder, name: str, tensor: str, axis: int) -> str:
    """`tensor.size(axis)` as torch exports it for a view target: Unsqueeze(Gather(Shape(tensor), axis))."""
    shape = b.node("Shape", f"{name}_shape", [tensor])
    size = b.node("Gather", f"{name}_size", [shape, b.const(f"{name}_axis", axis, np.int64)], axis=0)
    return b.node("Unsqueeze", name, [size, b.const(f"{name}_axes", [0], np.int64)])


def _last_entry(b: Builder, name: str, tensor: str) -> str:
    """`x.size(-1)` as HF's Conv1D exports it: Unsqueeze(Squeeze(Slice(Shape(x), -1, INT64_MAX)))."""
    shape = b.node("Shape", f"{name}_shape", [tensor])
    cut = b.node("Slice", f"{name}_slice", [shape, b.const(f"{name}_lo", [-1], np.int64),
                                            b.const(f"{name}_hi", [np.iinfo(np.int64).max], np.int64),
                                            b.const(f"{name}_sliced", [0], np.int64)])
    size = b.node("Squeeze", f"{name}_size", [cut, b.const(f"{name}_squeezed", [0], np.int64)])
    return b.node("Unsqueeze", name, [size, b.const(f"{name}_axes", [0], np.int64)])


def _conv1d(b: Builder, name: str, x: str, nx: int, nf: int, width_of: str | None = None) -> str:
    """HF's Conv1D on x [B, S, nx]: `x.view(-1, x.size(-1))` (the size read off `width_of`, x itself by
    default), Gemm, `view(B, S, nf)`."""
    flat_target = b.node("Concat", f"{name}_flat_target",
                         [b.const(f"{name}_rows", [-1], np.int64), _last_entry(b, f"{name}_width", width_of or x)], axis=0)
    flat = b.node("Reshape", f"{name}_flat", [x, flat_target])
    gemm = b.node("Gemm", name, [flat, b.randn(f"{name}.weight", [nx, nf], 1 / np.sqrt(nx)),
                                 b.randn(f"{name}.bias", [nf], 0.1)])
    back = b.node("Concat", f"{name}_back_target", [_entry(b, f"{name}_batch", x, 0), _entry(b, f"{name}_seq", x, 1),
                                                     b.const(f"{name}_features", [nf], np.int64)], axis=0)
    return b.node("Reshape", f"{name}_back", [gemm, back])


def conv1d_mlp() -> onnx.ModelProto:
    """GPT-2's MLP: Conv1D 16 -> 32, Relu, Conv1D 32 -> 8, on x [B, S, 16]."""
    b = Builder(seed=1)
    b.output(_conv1d(b, "proj", b.relu("act", _conv1d(b, "fc", "x", 16, 32)), 32, 8))
    return b.model([("x", ["B", "S", 16])], outputs=[("y", None)])


def patch_flatten() -> onnx.ModelProto:
    """ViT's patch embedding: Conv 3 -> 8, `flatten(2)` as Reshape(conv, Concat(Shape(conv)[0:2], [-1])),
    Transpose to [B, HW, 8], MatMul 8 -> 4."""
    b = Builder(seed=2)
    conv = b.conv("patches", "x", 3, 8, k=2, stride=2, pad=0)
    shape = b.node("Shape", "conv_shape", [conv])
    lead = b.node("Slice", "lead", [shape, b.const("lead_lo", [0], np.int64), b.const("lead_hi", [2], np.int64),
                                    b.const("lead_axes", [0], np.int64)])
    target = b.node("Concat", "flat_target", [lead, b.const("rest", [-1], np.int64)], axis=0)
    tokens = b.node("Transpose", "tokens", [b.node("Reshape", "flatten", [conv, target])], perm=[0, 2, 1])
    b.output(b.matmul("head", tokens, 8, 4))
    return b.model([("x", ["B", 3, 8, 8])], outputs=[("y", None)])


def other_tensors_width() -> onnx.ModelProto:
    """The Conv1D's flattening reads the width off a parallel projection of the same width (another
    group), not off its own input."""
    b = Builder(seed=3)
    hidden = b.relu("act", b.matmul("fc", "x", 16, 32))
    side = b.matmul("side", "x", 16, 32)
    b.output(_conv1d(b, "proj", hidden, 32, 8, width_of=side))
    b.output(b.matmul("side_proj", side, 32, 8), "z")
    return b.model([("x", ["B", "S", 16])], outputs=[("y", None), ("z", None)])


def square_view(read_axis: int, entry: int) -> onnx.ModelProto:
    """h = x @ W (16 -> 32) analysed at x [1, 32, 16], where the sequence and the channels are both 32;
    h.view(-1, 32) spelt with h.size(read_axis) at target entry `entry` (-1 at the other), then 32 -> 8.
    Only read_axis 2 at entry 1 is h's own channel count at its channel axis."""
    b = Builder(seed=4)
    h = b.relu("act", b.matmul("fc", "x", 16, 32))
    pieces = [b.const("rows", [-1], np.int64)]
    pieces.insert(entry, _entry(b, "width", h, read_axis))
    flat = b.node("Reshape", "view", [h, b.node("Concat", "view_target", pieces, axis=0)])
    b.output(b.matmul("proj", flat, 32, 8))
    return b.model([("x", ["B", "S", 16])], outputs=[("y", None)])


def paddle_tokens(picked_axis: int = 3, shape_op: str = "Cast", extra=None, norm: bool = False) -> onnx.ModelProto:
    """PP-OCRv4's SVTR neck as Paddle exports it: Conv 3 -> 8 to y [B, 8, H, W], tokens [B, HW, 8], and back
    by Reshape(tokens, Concat([0], [-1], Cast(Slice(Cast(Shape(y)), 3, 4)), [8])): the width is read off y's
    shape through casts, the channel entry is a constant. `picked_axis` 1 reads y's channel count instead;
    `shape_op` "Identity" copies the shape instead of the first Cast; `extra(b, copy)` adds other readers of
    that copy and returns the outputs they add; `norm` puts a LayerNorm before the MLP (SVTR's pre-norm), which
    makes the token stream a hidden one (`--hidden`)."""
    b = Builder(seed=5)
    conv = b.conv("neck", "x", 3, 8, k=3, stride=1)
    flat = b.node("Reshape", "flatten", [conv, b.const("flat", [0, 8, -1], np.int64)])
    tokens = b.node("Transpose", "tokens", [flat], perm=[0, 2, 1])
    normed = tokens
    if norm:
        normed = b.node("LayerNormalization", "norm", [tokens, b.const("norm_scale", np.ones(8)),
                                                       b.const("norm_bias", np.zeros(8))], axis=-1)
    mixed = b.relu("mix", b.node("Add", "residual", [tokens, b.matmul("mlp", normed, 8, 8)]))
    cast = {"to": onnx.TensorProto.INT32} if shape_op == "Cast" else {}
    shape = b.node(shape_op, "shape_copy", [b.node("Shape", "neck_shape", [conv])], **cast)
    bounds = [b.const("width_lo", [picked_axis], np.int64), b.const("width_hi", [picked_axis + 1], np.int64),
              b.const("width_axes", [0], np.int64)]
    width = b.node("Slice", "width", [shape, *bounds])
    if shape_op == "Cast":
        width = b.node("Cast", "width_i64", [width], to=onnx.TensorProto.INT64)
    target = b.node("Concat", "back_target", [b.const("keep_batch", [0], np.int64), b.const("rows", [-1], np.int64),
                                              width, b.const("channels", [8], np.int64)], axis=0)
    image = b.node("Transpose", "image", [b.node("Reshape", "back", [mixed, target])], perm=[0, 3, 1, 2])
    b.output(b.conv("head", image, 8, 4, k=1, pad=0))
    outputs = [("y", None), *(extra(b, shape) if extra else [])]
    return b.model([("x", ["B", 3, "H", "W"])], outputs=outputs)


def _identity_branch(name: str, shape: str, read_inside: bool) -> onnx.GraphProto:
    """An If branch passing the shape copy out (Identity), and reading its entry 0 inside too when asked."""
    nodes = [onnx.helper.make_node("Identity", [shape], [f"{name}_copy"], name=f"{name}_copy")]
    outputs = [onnx.helper.make_tensor_value_info(f"{name}_copy", onnx.TensorProto.INT32, [4])]
    if read_inside:
        nodes.append(onnx.helper.make_node("Gather", [f"{name}_copy", "zero"], [f"{name}_batch"], name=f"{name}_batch",
                                           axis=0))
        outputs.append(onnx.helper.make_tensor_value_info(f"{name}_batch", onnx.TensorProto.INT32, []))
    return onnx.helper.make_graph(nodes, name, [], outputs)


def _feed(shape, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _prunable(model, shapes) -> dict[str, int]:
    found = inspect(model, shapes, simplify=False)
    return {g["sources"][0]: g["channels"] for g in found["groups"] if g["prunable"]}


def _reasons(model, shapes) -> str:
    return " ".join(r for g in inspect(model, shapes, simplify=False)["groups"] for r in g["reasons"])


CASES = {  # name: (builder, analysed shapes, sizes checked, the group its own-size reshape must leave prunable)
    "conv1d_mlp": (conv1d_mlp, SEQ_SHAPES, [[1, 5, 16], [3, 5, 16], [2, 7, 16], [4, 1, 16]], ("fc", 32)),
    "patch_flatten": (patch_flatten, IMAGE_SHAPES, [[1, 3, 8, 8], [3, 3, 8, 8], [5, 3, 8, 8]], ("patches", 8)),
    "paddle_tokens": (paddle_tokens, {"x": [1, 3, 4, 6]}, [[1, 3, 4, 6], [2, 3, 4, 10], [3, 3, 6, 5]], ("neck", 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_own_size_entry_leaves_the_group_prunable(name):
    build, shapes, _, (source, channels) = CASES[name]
    assert _prunable(build(), shapes) == {source: channels}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruning_dead_channels_is_exact_at_every_size(name, seed):
    """Zero a seeded half of the group at the analysed size, prune exactly those: the outputs hold at other
    batch and sequence sizes, and the own-size entry stays computed."""
    build, shapes, sizes, _ = CASES[name]
    zeroed, plan = zero_dropped(build(), keep_fn=lambda a: drop_every_other(a, seed), input_shapes=shapes,
                                simplify=False)
    assert any(len(g.keep) < g.channels for g in plan.groups), "the oracle must drop something"
    result = prune(zeroed, PruneConfig(plan=plan, input_shapes=shapes, simplify=False))
    assert result.report["after"]["macs"] < result.report["before"]["macs"]
    ops = {n.op_type for n in result.model.graph.node}
    assert {"Shape", "Reshape"} <= ops
    for i, shape in enumerate(sizes):
        feed = _feed(shape, seed * 10 + i)
        np.testing.assert_allclose(run(result.model, feed)[0], run(zeroed, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_pruned_conv1d_mlp_runs_at_other_sizes():
    result = prune(conv1d_mlp(), PruneConfig(filters=0.5, scorer="l1", input_shapes=SEQ_SHAPES, simplify=False))
    gemm = next(n for n in result.model.graph.node if n.name == "fc")
    weight = next(t for t in result.model.graph.initializer if t.name == gemm.input[1])
    assert weight.dims[1] < 32
    for shape in ([1, 5, 16], [3, 5, 16], [3, 7, 16]):
        assert run(result.model, _feed(shape, 0))[0].shape == (*shape[:2], 8)


def test_the_width_of_another_tensor_blocks_both_groups():
    """Parallel projections of equal width: the count read off one does not follow the other's pruning."""
    model = other_tensors_width()
    assert _prunable(model, SEQ_SHAPES) == {}
    reasons = _reasons(model, SEQ_SHAPES)
    assert "Reshape 'proj_flat': its target's channel entry is the size of 'side_out', not of its input 'act_out'" in reasons
    assert "Shape 'proj_width_shape': the channel count of 'side_out' sizes Reshape 'proj_flat' of another tensor" in reasons


def test_the_size_of_another_axis_at_the_channel_entry_blocks():
    """h.size(1) equals the channel count only at the analysed sequence length."""
    model = square_view(read_axis=1, entry=1)
    assert _prunable(model, {"x": [1, 32, 16]}) == {}
    assert "Reshape 'view': its target's channel entry is its input's axis 1, not its channel axis 2" \
        in _reasons(model, {"x": [1, 32, 16]})


def test_the_channel_count_at_another_entry_blocks():
    """h.view(h.size(2), -1): the count sizes the rows, the channels land on the entry -1 infers."""
    model = square_view(read_axis=2, entry=0)
    assert _prunable(model, {"x": [1, 32, 16]}) == {}
    assert "Shape 'width_shape': the channel count is copied to entries [0] of Reshape 'view''s target, not (only) " \
        "to its channel axis 1" in _reasons(model, {"x": [1, 32, 16]})


def test_the_own_count_at_the_channel_entry_is_prunable_where_sizes_coincide():
    """The control of the two above: h.size(2) at entry 1."""
    assert _prunable(square_view(read_axis=2, entry=1), {"x": [1, 32, 16]}) == {"fc": 32}


def test_a_shape_cast_before_its_channel_entry_is_read_blocks():
    """The control of paddle_tokens: the same casts, slicing y's channel count into the target's width
    entry, which does not follow the kept count."""
    assert _prunable(paddle_tokens(picked_axis=1), {"x": [1, 3, 4, 6]}) == {}
    assert "Shape 'neck_shape': the channel count of 'neck_out' sizes Reshape 'back' of another tensor" \
        in _reasons(paddle_tokens(picked_axis=1), {"x": [1, 3, 4, 6]})


def test_an_identity_before_the_width_slice_is_looked_through_too():
    assert _prunable(paddle_tokens(shape_op="Identity"), {"x": [1, 3, 4, 6]}) == {"neck": 8}


def test_a_cast_shape_that_is_a_model_output_blocks():
    def extra(b, shape):
        b.output(shape, "shape_out")
        return [("shape_out", None, onnx.TensorProto.INT32)]
    assert _prunable(paddle_tokens(extra=extra), {"x": [1, 3, 4, 6]}) == {}


def test_a_second_reader_of_the_cast_reading_the_channel_entry_blocks():
    def extra(b, shape):
        b.output(b.node("Gather", "count", [shape, b.const("one", 1, np.int64)], axis=0), "count_out")
        return [("count_out", None, onnx.TensorProto.INT32)]
    assert _prunable(paddle_tokens(extra=extra), {"x": [1, 3, 4, 6]}) == {}


@pytest.mark.parametrize("read_inside", [False, True])
def test_a_cast_shape_passed_out_of_an_if_blocks(read_inside):
    """The copy leaves through an If's branch outputs (read there or not): the count goes out with it. The
    condition depends on the input, so loading cannot fold the If away."""
    def extra(b, shape):
        b.const("zero", 0, np.int64)
        condition = b.node("Greater", "positive", [b.node("ReduceMax", "peak", ["x"], keepdims=0), b.const("nil", 0.0)])
        names = ["passed", "batch"][:2 if read_inside else 1]
        b.nodes.append(onnx.helper.make_node("If", [condition], names, name="branch",
                                             then_branch=_identity_branch("then", shape, read_inside),
                                             else_branch=_identity_branch("else", shape, read_inside)))
        return [(name, None, onnx.TensorProto.INT32) for name in names]
    model = paddle_tokens(extra=extra)
    onnx.checker.check_model(model)
    assert _prunable(model, {"x": [1, 3, 4, 6]}) == {}


def test_the_cli_prunes_a_paddle_neck_behind_a_layernorm_with_hidden(tmp_path):
    """PP-OCRv4's SVTR neck as Paddle exports it, pre-norm: `inspect` blocks its token stream and suggests
    --hidden; with it, the stream is one group with the conv before it, and `prune --hidden` writes a model that
    runs at other sizes than the one it was analysed at."""
    import json

    from click.testing import CliRunner

    from onnxprune.cli import main

    path, out = tmp_path / "neck.onnx", tmp_path / "pruned.onnx"
    path.write_bytes(paddle_tokens(norm=True).SerializeToString())

    def neck(*args) -> dict:
        result = CliRunner().invoke(main, ["inspect", str(path), "--json", "--input-shape", "x:1x3x4x6", *args],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return next(g for g in json.loads(result.output)["groups"] if "neck" in g["sources"])

    blocked = neck()
    assert not blocked["prunable"] and "--hidden" in " ".join(blocked["reasons"])
    stream = neck("--hidden")
    assert stream["prunable"] and stream["channels"] == 8 and {"neck", "mlp"} <= set(stream["sources"])
    result = CliRunner().invoke(main, [str(path), str(out), "--hidden", "--filters", "0.5", "--input-shape",
                                       "x:1x3x4x6"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pruned = onnx.load(out)
    weights = {t.name: t.dims for t in pruned.graph.initializer}
    assert [d for name, d in weights.items() if name.startswith("neck")][0][0] == 4
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    for shape in ([2, 3, 4, 10], [3, 3, 6, 5]):
        (y,) = session.run(None, _feed(shape, 1))
        assert y.shape == (shape[0], 4, shape[2], shape[3])
