"""Element-wise ops: activations, SiLU, per-channel constants, the residual Add that joins two
producers, Softmax (blocked); an element-wise op costs one MAC per output element."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.validate.cost import node_macs
from tests.builders import DEFAULT_OPSET, Builder, x_input
from tests.oracle import family_tests


ACTIVATIONS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Erf", "Gelu",
    "Softplus", "Elu", "Selu", "Celu", "Softsign", "Mish", "ThresholdedRelu", "PRelu",
)


_ACT_OPSET = {"Gelu": 20, "Mish": 18}


def activation(op: str, seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> <op> -> conv2(8->4) for the element-wise activation ``op``.

    Clip takes min/max as scalar initializers; PRelu a per-channel slope of shape [8, 1, 1] (sliced
    with the channels); Gelu uses opset 20, Mish opset 18.  Prunable: conv1's 8 channels.
    """
    if op not in ACTIVATIONS:
        raise ValueError(f"unknown activation {op}")
    b = Builder(seed, opset=_ACT_OPSET.get(op, DEFAULT_OPSET))
    h = b.conv("conv1", "x", 3, 8)
    name = f"act1_{op.lower()}"
    if op == "Clip":
        h = b.node(op, name, [h, b.const(f"{name}.min", -0.5), b.const(f"{name}.max", 0.8)])
    elif op == "PRelu":
        h = b.node(op, name, [h, b.const(f"{name}.slope", b.rng.uniform(0.05, 0.3, [8, 1, 1]))])
    elif op == "LeakyRelu":
        h = b.node(op, name, [h], alpha=0.1)
    elif op == "ThresholdedRelu":
        h = b.node(op, name, [h], alpha=0.1)
    else:
        h = b.node(op, name, [h])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name=f"activation_{op}")


def silu(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Mul(h, Sigmoid(h)) -> conv2(8->4).

    Prunable: conv1's 8 channels (the Mul has two non-constant operands from the same group).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.node("Mul", "silu1_mul", [h, b.node("Sigmoid", "silu1_sigmoid", [h])])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="silu")


PER_CHANNEL_OPS = ("Add", "Sub", "Mul", "Div")


PER_CHANNEL_VARIANTS = ("channel", "scalar", "first")


def per_channel_const(op: str, variant: str = "channel", seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> <op>(h, c) -> conv2(8->4) with a constant ``c``.

    variant "channel": c has shape [1, 8, 1, 1] (sliced with the channels); "scalar": c has shape
    [] (passes through); "first": c of shape [1, 8, 1, 1] is the FIRST operand, <op>(c, h).
    Prunable: conv1's 8 channels.  Div constants stay away from zero.  For Div/"first" (c / h)
    conv1's bias is centred on 5 so that h stays away from zero; caveat: zeroing a channel of conv1
    makes c / 0 = inf there, so an exactness oracle must make channels dead through conv2's input
    weights rather than by zeroing conv1.
    """
    if op not in PER_CHANNEL_OPS or variant not in PER_CHANNEL_VARIANTS:
        raise ValueError(f"per_channel_const({op!r}, {variant!r})")
    b = Builder(seed)
    # c / h needs h away from zero: conv1's bias is centred on 5 there (h ~ N(5, 1))
    h = b.conv("conv1", "x", 3, 8, bias_mean=5.0 if (op, variant) == ("Div", "first") else 0.0)
    shape = [] if variant == "scalar" else [1, 8, 1, 1]
    if op in ("Mul", "Div"):
        vals = b.rng.uniform(0.5, 1.5, shape) * b.rng.choice([-1.0, 1.0], shape)
    else:
        vals = b.rng.standard_normal(shape) * 0.5
    if (op, variant) == ("Div", "first"):
        vals = vals * 5.0  # keeps c / h O(1)
    c = b.const(f"{op.lower()}1.const", vals)
    ins = [c, h] if variant == "first" else [h, c]
    h = b.node(op, f"{op.lower()}1", ins)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name=f"per_channel_{op}_{variant}")


def residual(seed: int = 0) -> onnx.ModelProto:
    """conv1 -> bn1 -> relu1 -> [conv2 -> bn2] + skip(relu1) -> Add -> relu2 -> conv3(8->4).

    Prunable: one group of 8 channels joining conv1/bn1 and conv2/bn2 outputs (the Add couples them;
    conv2's input channels are the same group).
    """
    b = Builder(seed)
    r = b.relu("relu1", b.bn("bn1", b.conv("conv1", "x", 3, 8, bias=False), 8))
    h = b.bn("bn2", b.conv("conv2", r, 8, 8, bias=False), 8)
    h = b.relu("relu2", b.node("Add", "add1", [h, r]))
    b.output(b.conv("conv3", h, 8, 4))
    return b.model(x_input(), name="residual")


def blocked_softmax(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Softmax(axis=1) -> conv2(8->4).  Blocked: Softmax mixes the channels."""
    b = Builder(seed)
    h = b.node("Softmax", "softmax1", [b.conv("conv1", "x", 3, 8)], axis=1)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="blocked_softmax")


BUILDERS = {
    **{f"activation_{op}": functools.partial(activation, op) for op in ACTIVATIONS},
    "silu": silu,
    **{f"per_channel_{op}_{v}": functools.partial(per_channel_const, op, v)
       for op in PER_CHANNEL_OPS for v in PER_CHANNEL_VARIANTS},
    "residual": residual,
    "blocked_softmax": blocked_softmax,
}
BLOCKED = {"blocked_softmax": "Softmax"}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


@pytest.mark.parametrize("op,inputs", [("Relu", ["x"]), ("Add", ["x", "c"]), ("Mul", ["x", "c"]), ("Sigmoid", ["x"])])
def test_an_element_wise_op_costs_one_mac_per_output_element(op, inputs):
    shapes = {"x": (1, 8, 4, 4), "c": (1, 8, 1, 1), "y": (1, 8, 4, 4)}
    assert node_macs(helper.make_node(op, inputs, ["y"]), shapes, {}) == 128
