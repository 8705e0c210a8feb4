"""Conv and ConvTranspose: plain, grouped, depthwise (with a channel multiplier) and transposed convs;
their weight layout against onnxruntime and their cost formulas."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.validate.cost import node_macs
from tests.builders import Builder, x_input
from tests.oracle import family_tests
from tests.ops.weighted import check_weight_layout


def conv_chain(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, k3, pad1) + bias -> Relu -> Conv(8->4).  Prunable: conv1's 8 output channels."""
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="conv_chain")


def residual_downsample(seed: int = 0) -> onnx.ModelProto:
    """conv0(3->8) -> relu0 -> {conv_a(8->16, k3, stride 2) -> bn_a ; shortcut(8->16, 1x1, stride 2)
    -> bn_s} -> Add -> relu -> conv_out(16->4).

    Prunable: the 16-channel group joining conv_a/bn_a and shortcut/bn_s (via the Add); separately
    conv0's 8 channels (consumed by both branches).
    """
    b = Builder(seed)
    h = b.relu("relu0", b.conv("conv0", "x", 3, 8))
    a = b.bn("bn_a", b.conv("conv_a", h, 8, 16, k=3, stride=2, bias=False), 16)
    s = b.bn("bn_s", b.conv("shortcut", h, 8, 16, k=1, stride=2, pad=0, bias=False), 16)
    h = b.relu("relu1", b.node("Add", "add1", [a, s]))
    b.output(b.conv("conv_out", h, 16, 4))
    return b.model(x_input(), name="residual_downsample")


def depthwise(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> depthwise Conv(group=8, 8->8, k3) -> Relu -> Conv 1x1(8->4).

    Prunable: one group of 8 channels (conv1 outputs coupled through the depthwise conv to its
    outputs).
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.relu("relu2", b.conv("dwconv1", h, 8, 8, group=8))
    b.output(b.conv("conv2", h, 8, 4, k=1))
    return b.model(x_input(), name="depthwise")


def depthwise_multiplier(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->4) -> depthwise Conv(group=4, 4->8, multiplier 2) -> conv2(8->4).

    Prunable: conv1's 4 channels; pruning input channel i removes dwconv1 outputs 2i, 2i+1.  The
    dwconv's 8 outputs can also be pruned individually (a separate group).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 4)
    h = b.conv("dwconv1", h, 4, 8, group=4)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="depthwise_multiplier")


def grouped(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Conv(group=2, 8->8) -> Relu -> conv2(8->4).

    Prunable: conv1's 8 channels (in two blocks of 4 feeding the two groups; pruning must keep the
    blocks equal-sized) and gconv1's 8 outputs (two blocks of 4).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.relu("relu1", b.conv("gconv1", h, 8, 8, group=2))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="grouped")


def conv_transpose(seed: int = 0, group: int = 1) -> onnx.ModelProto:
    """conv1(3->8) -> ConvTranspose(8->6, k2, stride 2, group) -> Relu -> conv2(6->4).

    Prunable: conv1's 8 channels (ConvTranspose weight axis 0) and deconv1's 6 outputs (weight axis
    1, per group).  Output is 32x32.
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.relu("relu1", b.conv_transpose("deconv1", h, 8, 6, group=group))
    b.output(b.conv("conv2", h, 6, 4))
    return b.model(x_input(), name="conv_transpose" if group == 1 else "conv_transpose_grouped")


def conv_transpose_grouped(seed: int = 0) -> onnx.ModelProto:
    """conv_transpose with group=2 (weight [8, 3, 2, 2]); channels pruned per group block."""
    return conv_transpose(seed, group=2)


BUILDERS = {
    "conv_chain": conv_chain,
    "residual_downsample": residual_downsample,
    "depthwise": depthwise,
    "depthwise_multiplier": depthwise_multiplier,
    "grouped": grouped,
    "conv_transpose": conv_transpose,
    "conv_transpose_grouped": conv_transpose_grouped,
}
BLOCKED: dict[str, str] = {}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


def _conv_model(op: str, c_in: int, weight_shape, spatial, **attrs) -> onnx.ModelProto:
    b = Builder(3)
    w = b.randn("layer.weight", weight_shape, 0.3)
    bias = b.randn("layer.bias", [weight_shape[0] if op == "Conv" else weight_shape[1] * attrs.get("group", 1)], 0.1)
    b.output(b.node(op, "layer", ["x", w, bias], **attrs))
    return b.model([("x", [2, c_in, *spatial])])


@pytest.mark.parametrize("op,c_in,weight_shape,spatial,attrs", [
    ("Conv", 3, [8, 3, 3, 3], [9, 8], dict(pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2])),
    ("Conv", 8, [6, 4, 3, 3], [7, 7], dict(group=2, auto_pad="SAME_UPPER", strides=[2, 2])),
    ("Conv", 4, [8, 1, 3], [11], dict(group=4, auto_pad="SAME_LOWER")),
    ("ConvTranspose", 8, [8, 3, 2, 3], [5, 4], dict(group=2, strides=[2, 3], pads=[1, 0, 0, 1])),
    ("ConvTranspose", 4, [4, 5, 3, 3], [4, 5], dict(strides=[2, 2], dilations=[2, 1], output_padding=[1, 1])),
    ("ConvTranspose", 4, [4, 2, 3], [6], dict(strides=[2], auto_pad="SAME_UPPER")),
])
def test_weight_layout_reproduces_the_conv(op, c_in, weight_shape, spatial, attrs):
    check_weight_layout(_conv_model(op, c_in, weight_shape, spatial, **attrs), "layer")


def _macs(op, shapes, **attrs) -> int:
    return node_macs(helper.make_node(op, list(shapes)[:-1], [list(shapes)[-1]], **attrs), shapes, {})


def test_conv_macs_are_output_elements_times_fan_in():
    # 8 filters x 16x16 outputs, each reading 3 channels x 3x3
    assert _macs("Conv", {"x": (1, 3, 16, 16), "w": (8, 3, 3, 3), "y": (1, 8, 16, 16)}) == 8 * 256 * 27
    # group 2: each of the 8 filters reads 4 of the 8 input channels
    assert _macs("Conv", {"x": (1, 8, 8, 8), "w": (8, 4, 3, 3), "y": (1, 8, 8, 8)}, group=2) == 8 * 64 * 36
    # depthwise, stride 2: one input channel per filter
    assert _macs("Conv", {"x": (1, 8, 8, 8), "w": (8, 1, 3, 3), "y": (1, 8, 4, 4)}, group=8) == 8 * 16 * 9


def test_conv_transpose_macs_are_input_elements_times_outputs_per_group_and_kernel():
    # every input element (8 channels x 5x5) meets 3 output channels of its group x 2x2 taps
    shapes = {"x": (1, 8, 5, 5), "w": (8, 3, 2, 2), "y": (1, 6, 10, 10)}
    assert _macs("ConvTranspose", shapes, group=2, strides=[2, 2]) == 200 * 3 * 4
    shapes = {"x": (2, 4, 3, 3), "w": (4, 6, 3, 3), "y": (2, 6, 7, 7)}
    assert _macs("ConvTranspose", shapes, strides=[2, 2]) == 72 * 6 * 9
