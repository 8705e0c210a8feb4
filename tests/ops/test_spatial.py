"""Spatial ops: pooling, squeeze-and-excite (ReduceMean or GlobalAveragePool), Resize, Pad; pooling costs
one MAC per window element, a global pool or reduction one per input element."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.validate.cost import node_macs
from tests.builders import DEFAULT_OPSET, Builder, x_input
from tests.oracle import family_tests


POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def pooling(op: str, seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> <op> -> conv2(8->4, 1x1).  MaxPool/AveragePool are k2 stride 2.

    Prunable: conv1's 8 channels (pooling is per channel).
    """
    if op not in POOLS:
        raise ValueError(f"unknown pooling op {op}")
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    if op.startswith("Global"):
        h = b.node(op, "pool1", [h])
    else:
        h = b.node(op, "pool1", [h], kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.conv("conv2", h, 8, 4, k=1))
    return b.model(x_input(), name=f"pooling_{op}")


def squeeze_excite(seed: int = 0, pool: str = "reducemean", opset: int = DEFAULT_OPSET
                   ) -> onnx.ModelProto:
    """conv1(3->8) -> Relu = h; ReduceMean(h, [2, 3], keepdims=1) (or GlobalAveragePool) ->
    se_reduce 1x1 (8->2) -> Relu -> se_expand 1x1 (2->8) -> HardSigmoid = s; Mul(h, s) ->
    conv2(8->4).

    Prunable: one 8-channel group joining conv1 and se_expand outputs (the Mul couples them; the
    pooling and se_reduce's inputs follow); separately se_reduce's 2 channels.  ReduceMean axes are
    an attribute below opset 18 and an input from 18 on.
    """
    if pool not in ("reducemean", "gap"):
        raise ValueError(pool)
    b = Builder(seed, opset=opset)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    if pool == "gap":
        p = b.node("GlobalAveragePool", "se_pool", [h])
    elif opset < 18:
        p = b.node("ReduceMean", "se_pool", [h], axes=[2, 3], keepdims=1)
    else:
        p = b.node("ReduceMean", "se_pool", [h, b.const("se_pool.axes", [2, 3], np.int64)],
                   keepdims=1)
    s = b.relu("se_relu", b.conv("se_reduce", p, 8, 2, k=1))
    s = b.node("HardSigmoid", "se_gate", [b.conv("se_expand", s, 2, 8, k=1)])
    h = b.node("Mul", "se_mul", [h, s])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name=f"squeeze_excite_{pool}_opset{opset}")


def resize(seed: int = 0, use_sizes: bool = False) -> onnx.ModelProto:
    """conv1(3->8) -> Resize(nearest, x2) -> conv2(8->4).

    ``use_sizes=False``: scales [1, 1, 2, 2]; ``True``: sizes [1, 8, 32, 32], whose channel entry
    must be rewritten when pruning.  Prunable: conv1's 8 channels.
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    if use_sizes:
        ins = [h, "", "", b.const("resize1.sizes", [1, 8, 32, 32], np.int64)]
    else:
        ins = [h, "", b.const("resize1.scales", [1, 1, 2, 2])]
    h = b.node("Resize", "resize1", ins, mode="nearest")
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="resize_sizes" if use_sizes else "resize")


def resize_to_computed_sizes(seed: int = 0, other_shape: bool = False) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> Resize(sizes = Concat(Slice(Shape(.), 0, 2), [32, 32])) -> conv2(8->4): torch's
    `interpolate(x, size=(32, 32))`. Prunable: conv1's 8 channels (the sizes follow the input at run time).

    ``other_shape``: the sizes read the shape of another tensor (convb's, 8 channels of another group): blocked.
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    measured = b.conv("convb", "x", 3, 8) if other_shape else h
    head = b.node("Slice", "slice", [b.node("Shape", "shape", [measured]), b.const("zero", [0], np.int64),
                                     b.const("two", [2], np.int64), b.const("axis0", [0], np.int64)])
    sizes = b.node("Concat", "sizes", [head, b.const("hw", [32, 32], np.int64)], axis=0)
    h = b.node("Resize", "resize1", [h, "", "", sizes], mode="linear")
    if other_shape:
        h = b.node("Add", "join", [h, b.node("Resize", "resize_b", [measured, "", "", sizes], mode="linear")])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), outputs=[("y", [1, 4, 32, 32])], name="resize_to_computed_sizes")


def resize_to_its_channel_count(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> Resize(sizes = Concat(Slice(Shape(.), 0, 2), Slice(Shape(.), 1, 2), [16])) ->
    conv2(8->4, 1x1): the output height is the channel count. Blocked: pruning would change the height."""
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    shape = b.node("Shape", "shape", [h])
    head = b.node("Slice", "slice", [shape, b.const("zero", [0], np.int64), b.const("two", [2], np.int64),
                                     b.const("axis0", [0], np.int64)])
    count = b.node("Slice", "count", [shape, b.const("one", [1], np.int64), "two", "axis0"])
    sizes = b.node("Concat", "sizes", [head, count, b.const("width", [16], np.int64)], axis=0)
    h = b.node("Resize", "resize1", [h, "", "", sizes], mode="nearest")
    b.output(b.conv("conv2", h, 8, 4, k=1))
    return b.model(x_input(), outputs=[("y", [1, 4, 8, 16])], name="resize_to_its_channel_count")


def pad(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Pad(constant mode, 1 on each spatial side, value 0) -> conv2(8->4, pad 0).

    Prunable: conv1's 8 channels (pads on the channel axis are zero).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    ins = [h, b.const("pad1.pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
           b.const("pad1.value", 0.0)]
    h = b.node("Pad", "pad1", ins, mode="constant")
    b.output(b.conv("conv2", h, 8, 4, pad=0))
    return b.model(x_input(), name="pad")


BUILDERS = {
    **{f"pooling_{op}": functools.partial(pooling, op) for op in POOLS},
    "squeeze_excite": squeeze_excite,
    "squeeze_excite_gap": functools.partial(squeeze_excite, pool="gap"),
    "squeeze_excite_opset18": functools.partial(squeeze_excite, opset=18),
    "resize": resize,
    "resize_sizes": functools.partial(resize, use_sizes=True),
    "resize_to_computed_sizes": resize_to_computed_sizes,
    "blocked_resize_to_sizes_of_another_tensor": functools.partial(resize_to_computed_sizes, other_shape=True),
    "blocked_resize_to_its_channel_count": resize_to_its_channel_count,
    "pad": pad,
}
BLOCKED: dict[str, str] = {"blocked_resize_to_sizes_of_another_tensor": "output sizes are computed",
                           "blocked_resize_to_its_channel_count": "the channel count is read and used"}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_pooling_costs_one_mac_per_window_element(op):
    shapes = {"x": (1, 8, 16, 16), "y": (1, 8, 8, 8)}
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    assert node_macs(node, shapes, {}) == 8 * 64 * 4
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    assert node_macs(node, {"x": (1, 8, 16, 16), "y": (1, 8, 16, 16)}, {}) == 8 * 256 * 9


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum"])
def test_a_global_pool_or_reduction_costs_one_mac_per_input_element(op):
    assert node_macs(helper.make_node(op, ["x"], ["y"]), {"x": (1, 8, 16, 16), "y": (1, 8, 1, 1)}, {}) == 2048
