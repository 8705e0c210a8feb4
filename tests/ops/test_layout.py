"""Data movement: Concat, Split, Slice, Reshape (to literal and computed shapes, the channel shuffle),
Transpose, Gather off the channel axis, pass-through ops (Dropout, Identity, Cast); a graph output, TopK
and Gather of channels (blocked). Moving data
costs nothing."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import inspect
from onnxprune.validate.cost import DATA_MOVEMENT, model_cost, node_macs
from tests.builders import Builder, x_input
from tests.oracle import assert_exact_on, family_tests


def concat(seed: int = 0) -> onnx.ModelProto:
    """conv_a(3->4), conv_b(3->6) -> Concat(axis=1) -> Relu -> conv_out(10->4).

    Prunable: conv_a's 4 and conv_b's 6 channels (two groups, mapped to offsets 0 and 4 of the concat).
    """
    b = Builder(seed)
    a = b.conv("conv_a", "x", 3, 4)
    c = b.conv("conv_b", "x", 3, 6)
    h = b.relu("relu1", b.node("Concat", "concat1", [a, c], axis=1))
    b.output(b.conv("conv_out", h, 10, 4))
    return b.model(x_input(), name="concat")


def split(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Split(axis=1, split=[3, 5] as an input) -> conv_a(3->4), conv_b(5->4) -> Add.

    Prunable: conv1's 8 channels; pruning changes the split sizes (indices 0..2 go to conv_a,
    3..7 to conv_b).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    sizes = b.const("split1.split", [3, 5], np.int64)
    p0, p1 = b.node("Split", "split1", [h, sizes], n_out=2, axis=1)
    a = b.conv("conv_a", p0, 3, 4)
    c = b.conv("conv_b", p1, 5, 4)
    b.output(b.node("Add", "add1", [a, c]))
    return b.model(x_input(), name="split")


def slice_(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Slice(axis 1, starts 2, ends 7) -> conv2(5->4).

    Prunable: conv1's 8 channels; channels 0, 1, 7 are dead (sliced away), 2..6 reach conv2.
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    ins = [h, b.const("slice1.starts", [2], np.int64), b.const("slice1.ends", [7], np.int64),
           b.const("slice1.axes", [1], np.int64), b.const("slice1.steps", [1], np.int64)]
    h = b.node("Slice", "slice1", ins)
    b.output(b.conv("conv2", h, 5, 4))
    return b.model(x_input(), name="slice")


def torch_chunk(seed: int = 0, read: str = "channels") -> onnx.ModelProto:
    """conv1(3->13) -> torch.chunk(2, dim=1) as torch exports it (ShuffleNetV2): C = Gather(Shape(h), [1]),
    n = (C + 1) / 2, Slices [0, n) and [n, 2n) (clipped to C: 7 and 6 channels) -> conv_a(7->4),
    conv_b(6->4) -> Add.

    Prunable: conv1's 13 channels, the bounds made the kept counts (``read="int32"``: the bounds int32). ``read="height"``: n = H - 9 (the same
    7) read off the height, which the channel count does not follow: blocked. ``read="elsewhere"``: n also
    slices the input x: the count is read for more than its own Slices: blocked.
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 13)
    shape = b.node("Shape", "shape1", [h])
    one = b.const("one", [1], np.int64)
    if read == "height":
        half = b.node("Sub", "half", [b.node("Gather", "size", [shape, b.const("two", [2], np.int64)], axis=0),
                                      b.const("nine", [9], np.int64)])
    else:
        size = b.node("Gather", "size", [shape, one], axis=0)
        half = b.node("Div", "half", [b.node("Add", "size_up", [size, one]), b.const("two", [2], np.int64)])
    end_a, end_b = (b.node("Mul", f"end_{n}", [half, b.const(f"times_{n}", [k], np.int64)]) for n, k in (("a", 1), ("b", 2)))
    zero, axis = b.const("zero", [0], np.int64), one
    if read == "int32":  # the bounds' type int32, as the rewrite must write them
        end_a, end_b = (b.node("Cast", f"{e}_32", [e], to=onnx.TensorProto.INT32) for e in (end_a, end_b))
        zero, axis = b.const("zero_32", [0], np.int32), b.const("axis_32", [1], np.int32)
    first = b.node("Slice", "chunk_a", [h, zero, end_a, axis])
    second = b.node("Slice", "chunk_b", [h, end_a, end_b, axis])
    out = b.node("Add", "add1", [b.conv("conv_a", first, 7, 4), b.conv("conv_b", second, 6, 4)])
    if read == "elsewhere":
        x_part = b.node("Slice", "x_part", ["x", "zero", end_a, one])  # clipped to x's 3 channels
        out = b.node("Add", "add2", [out, b.conv("conv_c", x_part, 3, 4)])
    b.output(out)
    return b.model(x_input(), name="torch_chunk")


def rows_by_channel_count(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->13) -> Slice of the rows [0, (C + 1) / 2), C = Gather(Shape(h), 1) (7 of 16) -> conv2(13->4).

    Prunable: conv1's 13 channels; the row bound, read off the channel count, keeps its value 7.
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 13)
    size = b.node("Gather", "size", [b.node("Shape", "shape1", [h]), b.const("one", 1, np.int64)], axis=0)
    half = b.node("Div", "half", [b.node("Add", "size_up", [size, b.const("up", 1, np.int64)]), b.const("two", 2, np.int64)])
    end = b.node("Unsqueeze", "end", [half, b.const("axis0", [0], np.int64)])
    rows = b.node("Slice", "rows", [h, b.const("zero", [0], np.int64), end, b.const("axis2", [2], np.int64)])
    b.output(b.conv("conv2", rows, 13, 4))
    return b.model(x_input(), name="rows_by_channel_count")


def channel_shuffle(seed: int = 0, flat: bool = False) -> onnx.ModelProto:
    """conv1(3->8) -> grouped conv2(8->8, group 2) -> Reshape [1,2,4,16,16] -> Transpose(0,2,1,3,4)
    -> Reshape [1,8,16,16] -> conv3(8->4): the ShuffleNet channel shuffle. ``flat``: the split reshape has the
    merge's rank, [1,2,4,256] (the merge back keeps the rank).

    Prunable: conv2's channels, the same position j in both shuffle blocks together.
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.conv("conv2", h, 8, 8, group=2)
    split = [1, 2, 4, 256] if flat else [1, 2, 4, 16, 16]
    h = b.node("Reshape", "split_blocks", [h, b.const("split_blocks.shape", split, np.int64)])
    h = b.node("Transpose", "shuffle", [h], perm=[0, 2, 1, 3] if flat else [0, 2, 1, 3, 4])
    h = b.node("Reshape", "merge_blocks", [h, b.const("merge_blocks.shape", [1, 8, 16, 16], np.int64)])
    b.output(b.conv("conv3", h, 8, 4))
    return b.model(x_input(), name="channel_shuffle")


def reshape_computed(seed: int = 0, read_channels: bool = False) -> onnx.ModelProto:
    """conv1(3->4) on 1x3x4x4 -> Relu -> Reshape to Concat(Shape(x)[0:1], [-1]) -> Gemm(64->10): the
    ``x.view(x.size(0), -1)`` export. With read_channels the target is Concat(Shape(x)[0:2], [-1]) (a
    ``flatten(2)``), which copies the channel count of x itself, and the channels reach the output.
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 4))
    shape = b.node("Shape", "shape1", [h])
    ends = 2 if read_channels else 1
    head = b.node("Slice", "head", [shape, b.const("head.starts", [0], np.int64),
                                     b.const("head.ends", [ends], np.int64), b.const("head.axes", [0], np.int64)])
    target = b.node("Concat", "target", [head, b.const("target.rest", [-1], np.int64)], axis=0)
    flat = b.node("Reshape", "flatten", [h, target])
    if read_channels:  # [1, 4, 16]: a MatMul over the spatial features
        b.output(b.matmul("fc", flat, 16, 10))
    else:
        b.output(b.node("Gemm", "fc", [flat, b.randn("fc.weight", [10, 64], 0.125)], transB=1))
    return b.model(x_input([1, 3, 4, 4]), name="reshape_computed")


def blocked_reshape_computed_channels(seed: int = 0) -> onnx.ModelProto:
    """x [1,5,16] -> fc1(16->32) -> Relu -> Reshape to Concat(Shape(x)[0:2], Shape(x)[2:3] * 2) -> fc2(32->8):
    the target's channel entry is computed (from x's features, not the channels).

    Blocked: the channel entry cannot be updated.
    """
    b = Builder(seed)
    h = b.relu("relu1", b.matmul("fc1", "x", 16, 32))
    shape = b.node("Shape", "shape1", ["x"])
    lead, features = (b.node("Slice", name, [shape, b.const(f"{name}.starts", [start], np.int64),
                                             b.const(f"{name}.ends", [end], np.int64), b.const(f"{name}.axes", [0], np.int64)])
                      for name, start, end in (("lead", 0, 2), ("features", 2, 3)))
    width = b.node("Mul", "width", [features, b.const("width.factor", [2], np.int64)])
    h = b.node("Reshape", "same", [h, b.node("Concat", "target", [lead, width], axis=0)])
    b.output(b.matmul("fc2", h, 32, 8))
    return b.model([("x", [1, 5, 16])], name="blocked_reshape_computed_channels")


def transpose_nhwc(seed: int = 0) -> onnx.ModelProto:
    """TF-export style: x NHWC [1,8,8,3] -> Transpose(0,3,1,2) -> conv1(3->8) -> Relu -> conv2(8->4).

    Prunable: conv1's 8 channels.
    """
    b = Builder(seed)
    h = b.node("Transpose", "to_nchw", ["x"], perm=[0, 3, 1, 2])
    h = b.relu("relu1", b.conv("conv1", h, 3, 8))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model([("x", [1, 8, 8, 3])], name="transpose_nhwc")


def transpose_matmul(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,8,8] -> conv1(3->8) -> Relu -> Transpose(0,2,3,1) to NHWC -> MatMul W[8,4] (last axis).

    Prunable: conv1's 8 channels, which sit on the last axis after the Transpose (W rows).
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.node("Transpose", "to_nhwc", [h], perm=[0, 2, 3, 1])
    b.output(b.matmul("fc1", h, 8, 4))
    return b.model(x_input([1, 3, 8, 8]), name="transpose_matmul")


def patch_tokens(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,8,8] -> conv1(3->8) -> Relu -> Reshape [1,8,64] (torch's flatten(2), a ViT's patch embedding) ->
    Transpose(0,2,1) -> fc1(8->4) -> Reshape [1,4,8,8] (back to an image) -> conv2(4->2).

    Prunable: conv1's 8 channels and fc1's 4: the spatial dims regroup among themselves, the channel axis stays.
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.node("Reshape", "flatten", [h, b.const("flatten.shape", [1, 8, 64], np.int64)])
    h = b.node("Transpose", "tokens", [h], perm=[0, 2, 1])
    h = b.node("Transpose", "channels_first", [b.matmul("fc1", h, 8, 4)], perm=[0, 2, 1])
    h = b.node("Reshape", "unflatten", [h, b.const("unflatten.shape", [1, 4, 8, 8], np.int64)])
    b.output(b.conv("conv2", h, 4, 2))
    return b.model(x_input([1, 3, 8, 8]), name="patch_tokens")


def class_token(seed: int = 0, token_width: int = 8) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1(3->8) -> flatten(2) -> Transpose -> tokens [N,64,8]; a class token [1,1,8]
    Expand-ed to [N,1,1] (torch's `cls.expand(B, -1, -1)` with a dynamic batch, the -1 written as 1) and
    Concat-ed before them -> fc1(8->4).

    Prunable: conv1's 8 channels, the expanded token gathered at the kept ones. ``token_width=1``: a [1,1,1]
    constant broadcast to the channels' width by the Expand: it spans the channels but is not theirs: blocked.
    """
    b = Builder(seed)
    h = b.node("Reshape", "flatten", [b.relu("relu1", b.conv("conv1", "x", 3, 8)), b.const("flatten.shape", [0, 8, 64], np.int64)])
    tokens = b.node("Transpose", "tokens", [h], perm=[0, 2, 1])
    batch = b.node("Slice", "batch", [b.node("Shape", "shape1", [tokens]), b.const("zero", [0], np.int64),
                                      b.const("one", [1], np.int64)])
    width = 1 if token_width == 8 else 8
    target = b.node("Concat", "target", [batch, b.const("ones", [1, width], np.int64)], axis=0)
    cls = b.node("Expand", "cls_expand", [b.randn("cls", [1, 1, token_width]), target])
    joined = b.node("Concat", "with_cls", [cls, tokens], axis=1)
    b.output(b.matmul("fc1", joined, 8, 4))
    return b.model(x_input(["N", 3, 8, 8]), name="class_token")


def blocked_batch_into_rows(seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> conv1(3->8) -> Reshape [8, -1] -> Transpose -> fc1(8->4): the batch vanishes into the
    rows; at batch 1 each row is a channel, at batch 2 a row mixes channels, so conv1 must stay whole."""
    b = Builder(seed)
    h = b.node("Reshape", "rows", [b.conv("conv1", "x", 3, 8), b.const("rows.shape", [8, -1], np.int64)])
    b.output(b.matmul("fc1", b.node("Transpose", "columns", [h], perm=[1, 0]), 8, 4))
    return b.model(x_input(["N", 3, 8, 8]), name="blocked_batch_into_rows")


def gather_token(seed: int = 0, channel_axis: bool = False) -> onnx.ModelProto:
    """x [1,5,16] -> fc1(16->32) -> Relu -> Gather(axis 1, index 0: the class token) -> fc2(32->8).
    channel_axis: Gather(axis 2, indices [0, 2, 4]) -> fc2(3->8) instead.

    Prunable: fc1's 32 channels (the token's features). channel_axis: blocked (gathers channels).
    """
    b = Builder(seed)
    h = b.relu("relu1", b.matmul("fc1", "x", 16, 32))
    if channel_axis:
        h = b.node("Gather", "pick", [h, b.const("pick.indices", [0, 2, 4], np.int64)], axis=2)
        b.output(b.matmul("fc2", h, 3, 8))
    else:
        h = b.node("Gather", "pick", [h, b.const("pick.index", 0, np.int64)], axis=1)
        b.output(b.matmul("fc2", h, 32, 8))
    return b.model([("x", [1, 5, 16])], name="gather_token")


def passthrough(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Dropout (inference) -> Identity -> Cast(to float) -> conv2(8->4).

    Prunable: conv1's 8 channels (all three ops pass channels through).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.node("Dropout", "dropout1", [h])
    h = b.node("Identity", "identity1", [h])
    h = b.node("Cast", "cast1", [h], to=TensorProto.FLOAT)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="passthrough")


def blocked_graph_output(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> conv2(8->4) = y, and conv1's output is also graph output "feat".

    Blocked: conv1's channels reach a graph output.  (conv2's 4 channels reach y as well.)
    """
    b = Builder(seed)
    f = b.conv("conv1", "x", 3, 8)
    b.output(f, "feat")
    h = b.relu("relu1", "feat")
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), outputs=("y", "feat"), name="blocked_graph_output")


def blocked_topk(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> TopK(k=8, axis=3) values -> conv2(8->4).

    Blocked: TopK has no handler (it would even keep channels apart here: it sorts along W).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    vals, _ = b.node("TopK", "topk1", [h, b.const("topk1.k", [8], np.int64)], n_out=2, axis=3)
    b.output(b.conv("conv2", vals, 8, 4))
    return b.model(x_input(), name="blocked_topk")


BUILDERS = {
    "concat": concat,
    "split": split,
    "slice": slice_,
    "torch_chunk": torch_chunk,
    "rows_by_channel_count": rows_by_channel_count,
    "torch_chunk_int32": functools.partial(torch_chunk, read="int32"),
    "blocked_chunk_of_height": functools.partial(torch_chunk, read="height"),
    "blocked_chunk_read_elsewhere": functools.partial(torch_chunk, read="elsewhere"),
    "channel_shuffle": channel_shuffle,
    "channel_shuffle_flat": functools.partial(channel_shuffle, flat=True),
    "reshape_computed": reshape_computed,
    "blocked_shape_read": functools.partial(reshape_computed, read_channels=True),
    "transpose_nhwc": transpose_nhwc,
    "transpose_matmul": transpose_matmul,
    "patch_tokens": patch_tokens,
    "class_token": class_token,
    "blocked_class_token_broadcast": functools.partial(class_token, token_width=1),
    "passthrough": passthrough,
    "gather_token": gather_token,
    "blocked_gather_channels": functools.partial(gather_token, channel_axis=True),
    "blocked_graph_output": blocked_graph_output,
    "blocked_topk": blocked_topk,
    "blocked_reshape_computed_channels": blocked_reshape_computed_channels,
    "blocked_batch_into_rows": blocked_batch_into_rows,
}
BLOCKED = {
    # its target copies the count off its own input's channel axis, which follows (test_own_size_reshape.py):
    # what blocks is the output the channels reach
    "blocked_shape_read": "channels reach graph output 'y'",
    "blocked_graph_output": "graph output 'feat'",
    "blocked_topk": "no handler",
    "blocked_gather_channels": "gathers along the channel axis",
    "blocked_reshape_computed_channels": "target shape is computed and its channel entry is not a constant",
    "blocked_batch_into_rows": "mixes the channel axis",
    "blocked_class_token_broadcast": "an untracked computed input spans the channels",
}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)

# In these static models every bound is fixed, and the computed_slices rule writes them as constants at
# loading (the cases above check that exact); as built, with a bound that would vary, the handlers block
BLOCKED_AS_BUILT = {
    "blocked_chunk_of_height": "Slice 'chunk_a': computed slice bounds",
    "blocked_chunk_read_elsewhere": "Shape 'shape1': the channel count is read and used",
}
_, test_computed_bounds_that_could_vary_are_left_whole_as_built = family_tests(
    {name: BUILDERS[name] for name in BLOCKED_AS_BUILT}, BLOCKED_AS_BUILT, simplify=False)


def _chunk_with_count_read(where: str) -> onnx.ModelProto:
    """torch_chunk whose count C is also a model output (``where="output"``: Shape(h) itself) or is read in
    an If branch whose result is a model output (``"subgraph"``): C would change when h is pruned."""
    model = torch_chunk()
    graph = model.graph
    if where == "output":
        graph.output.append(helper.make_tensor_value_info("shape1_out", onnx.TensorProto.INT64, [4]))
        return model
    branch = helper.make_graph([helper.make_node("Identity", ["size_out"], ["read"])], "branch", [],
                               [helper.make_tensor_value_info("read", onnx.TensorProto.INT64, [1])])
    graph.node.append(helper.make_node("If", ["cond"], ["count"], name="if1", then_branch=branch, else_branch=branch))
    graph.input.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    graph.output.append(helper.make_tensor_value_info("count", onnx.TensorProto.INT64, [1]))
    return model


@pytest.mark.parametrize("where, reason", [("output", "the channel count is a model output"),
                                           ("subgraph", "the channel count is read and used")])
def test_a_chunk_count_read_beyond_its_own_slices_blocks(where, reason):
    model = _chunk_with_count_read(where)
    onnx.checker.check_model(model)
    group = next(g for g in inspect(model, {"x": [1, 3, 16, 16]})["groups"] if g["sources"] == ["conv1"])
    assert not group["prunable"] and any(reason in r for r in group["reasons"])


@pytest.mark.parametrize("op", sorted(DATA_MOVEMENT))
def test_moving_data_costs_nothing(op):
    shapes = {"x": (1, 8, 4, 4), "y": (1, 8, 4, 4)}
    assert node_macs(helper.make_node(op, ["x"], ["y"]), shapes, {}) == 0


def test_pass_through_ops_add_no_cost_to_a_model():
    # conv1: 8 filters x 16x16 x (3 x 3x3); conv2: 4 filters x 16x16 x (8 x 3x3); Dropout, Identity, Cast: 0
    assert model_cost(passthrough(), {"x": [1, 3, 16, 16]})["macs"] == 8 * 256 * 27 + 4 * 256 * 72


def test_spatial_dims_regrouped_behind_the_channel_axis_keep_the_channels():
    """[1, C, H, W] -> [1, C, H * W] and back: every channel of both layers is prunable."""
    from onnxprune import inspect

    groups = {g["sources"][0]: g for g in inspect(patch_tokens())["groups"]}
    assert groups["conv1"]["prunable"] and groups["fc1"]["prunable"], groups


def test_an_expanded_class_token_is_gathered_at_the_kept_channels_at_any_batch():
    feed = {"x": np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    result = assert_exact_on(class_token(), feed)
    assert "Gather" in {n.op_type for n in result.model.graph.node}
