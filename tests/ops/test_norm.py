"""Normalisation layers: BatchNormalization (also with weights in Constant nodes), InstanceNormalization,
GroupNormalization (whole groups), LayerNormalization (blocked); a normalisation costs one MAC per
output element."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.validate.cost import node_macs
from tests.builders import Builder, random_input, run, weights_as_constants, x_input
from tests.oracle import family_tests, zero_dropped


def conv_bn_relu(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, no bias) -> BatchNormalization -> Relu -> Conv(8->4).

    Prunable: the 8 channels of conv1/bn1 (one group).
    """
    b = Builder(seed)
    h = b.relu("relu1", b.bn("bn1", b.conv("conv1", "x", 3, 8, bias=False), 8))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="conv_bn_relu")


def conv_bn_relu_constant_nodes(seed: int = 0) -> onnx.ModelProto:
    """conv_bn_relu with all weights in Constant nodes instead of initializers."""
    return weights_as_constants(conv_bn_relu(seed))


def instance_norm(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> InstanceNormalization(scale, B per channel) -> Relu -> conv2(8->4).

    Prunable: conv1's 8 channels (InstanceNormalization is per channel: scale/B sliced).
    """
    b = Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    ins = [h, b.const("in1.scale", b.rng.uniform(0.5, 1.5, 8)),
           b.const("in1.bias", b.rng.standard_normal(8) * 0.1)]
    h = b.relu("relu1", b.node("InstanceNormalization", "in1", ins, epsilon=1e-5))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(x_input(), name="instance_norm")


def group_norm(seed: int = 0, opset: int = 21) -> onnx.ModelProto:
    """conv1(3->8) -> GroupNormalization(num_groups=4) -> conv2(8->4).

    opset 18: scale/bias have shape [num_groups] (the version-18 definition).  onnx >= 1.19's
    checker refuses it ("Op registered for GroupNormalization is deprecated in domain_version of
    18") although onnxruntime runs it, so it is listed in ``checker_rejected_builders()``, not
    ``all_builders()``.  opset 21: per-channel scale/bias of shape [C].  Prunable: conv1's 8 channels only in whole
    groups (2 channels per group), or only with num_groups changed -- statistics are per group, so
    pruning part of a group changes the result; a handler may reasonably block it.
    """
    if opset not in (18, 21):
        raise ValueError("group_norm: opset must be 18 or 21")
    b = Builder(seed, opset=opset)
    h = b.conv("conv1", "x", 3, 8)
    n = 4 if opset == 18 else 8
    ins = [h, b.const("gn1.scale", b.rng.uniform(0.5, 1.5, n)),
           b.const("gn1.bias", b.rng.standard_normal(n) * 0.1)]
    h = b.node("GroupNormalization", "gn1", ins, num_groups=4, epsilon=1e-5)
    b.output(b.conv("conv2", h, 8, 4))
    # shape inference does not see through the GroupNormalization function: declare the output
    return b.model(x_input(), outputs=[("y", [1, 4, 16, 16])], name=f"group_norm_opset{opset}")


def blocked_layernorm(seed: int = 0) -> onnx.ModelProto:
    """x [1,5,16] -> MatMul W1[16,32] -> Add b1 -> LayerNormalization(axis=-1) -> MatMul W2[32,16].

    Blocked: LayerNormalization normalizes over the 32 hidden channels (statistics mix them).
    """
    b = Builder(seed)
    h = b.add_bias("fc1_bias", b.matmul("fc1", "x", 16, 32), 32)
    ins = [h, b.const("ln1.scale", b.rng.uniform(0.5, 1.5, 32)),
           b.const("ln1.bias", b.rng.standard_normal(32) * 0.1)]
    h = b.node("LayerNormalization", "ln1", ins, axis=-1, epsilon=1e-5)
    b.output(b.matmul("fc2", h, 32, 16))
    return b.model([("x", [1, 5, 16])], name="blocked_layernorm")


BUILDERS = {
    "conv_bn_relu": conv_bn_relu,
    "conv_bn_relu_constant_nodes": conv_bn_relu_constant_nodes,
    "instance_norm": instance_norm,
    "group_norm_opset21": functools.partial(group_norm, opset=21),
    "blocked_layernorm": blocked_layernorm,
}
BLOCKED = {"blocked_layernorm": "LayerNormalization"}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


def test_group_norm_opset18_per_group_scale():
    """Opset-18 GroupNormalization (per-group scale) is refused by onnx's checker but run by
    onnxruntime: the rewrite is still exact, and the report says the input fails the checker too."""
    from onnxprune import PruneConfig, prune

    zeroed, plan = zero_dropped(group_norm(opset=18))
    result = prune(zeroed, PruneConfig(plan=plan))
    assert result.report["checker"]["passed"] is False and "input model" in result.report["checker"]["note"]
    feed = random_input(zeroed)
    np.testing.assert_allclose(run(result.model, feed)[0], run(zeroed, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["BatchNormalization", "InstanceNormalization", "LayerNormalization"])
def test_a_normalisation_costs_one_mac_per_output_element(op):
    shapes = {"x": (1, 8, 4, 4), "scale": (8,), "bias": (8,), "y": (1, 8, 4, 4)}
    assert node_macs(helper.make_node(op, ["x", "scale", "bias"], ["y"]), shapes, {}) == 128
