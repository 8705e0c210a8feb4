"""Gemm and MatMul: conv features flattened into a Gemm, transformer MLPs, an Einsum left blocked;
their weight layout against onnxruntime and their cost formulas."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.validate.cost import node_macs
from tests.builders import Builder, x_input
from tests.oracle import family_tests
from tests.ops.weighted import check_weight_layout


def _conv_to_fc(seed: int, how: str) -> onnx.ModelProto:
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 4))  # [1, 4, 4, 4]
    if how == "flatten":
        h = b.node("Flatten", "flatten1", [h], axis=1)
    else:
        shape = [1, -1] if how == "reshape" else [1, 64]
        h = b.node("Reshape", "reshape1", [h, b.const("reshape1.shape", shape, np.int64)])
    ins = [h, b.randn("fc1.weight", [10, 64], 1 / 8), b.randn("fc1.bias", [10], 0.1)]
    b.output(b.node("Gemm", "fc1", ins, transB=1))
    return b.model(x_input([1, 3, 4, 4]), name=f"{how}_gemm")


def flatten_gemm(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,4,4] -> conv1(3->4) -> Relu -> Flatten(axis=1) -> Gemm(transB=1, 64->10).

    Prunable: conv1's 4 channels; channel c maps to Gemm input columns 16c .. 16c+15.
    """
    return _conv_to_fc(seed, "flatten")


def reshape_gemm(seed: int = 0) -> onnx.ModelProto:
    """flatten_gemm with Reshape to a constant shape [1, -1] instead of Flatten."""
    return _conv_to_fc(seed, "reshape")


def reshape_gemm_literal(seed: int = 0) -> onnx.ModelProto:
    """flatten_gemm with Reshape to the literal shape [1, 64] (must become [1, 16 * kept])."""
    return _conv_to_fc(seed, "literal")


def mlp(seed: int = 0) -> onnx.ModelProto:
    """Transformer MLP on x [1, 5, 16]: MatMul W1[16,32] -> Add b1[32] -> GELU spelled out as
    h * 0.5 * (1 + Erf(h / sqrt 2)) (Div, Erf, Add, Mul, Mul as PyTorch exports it) ->
    MatMul W2[32,16] -> Add b2[16].

    Prunable: the hidden 32 channels (last axis; W1 columns, b1, W2 rows).
    """
    b = Builder(seed)
    h = b.add_bias("fc1_bias", b.matmul("fc1", "x", 16, 32), 32)
    t = b.node("Div", "gelu_div", [h, b.const("gelu.sqrt2", math.sqrt(2.0))])
    t = b.node("Erf", "gelu_erf", [t])
    t = b.node("Add", "gelu_add", [t, b.const("gelu.one", 1.0)])
    t = b.node("Mul", "gelu_mul", [h, t])
    t = b.node("Mul", "gelu_half", [t, b.const("gelu.half", 0.5)])
    b.output(b.add_bias("fc2_bias", b.matmul("fc2", t, 32, 16), 16))
    return b.model([("x", [1, 5, 16])], name="mlp")


def mlp_gemm(seed: int = 0) -> onnx.ModelProto:
    """2-D x [4, 16] -> Gemm(transB=1, W1[32,16]) -> Relu -> Gemm(transB=0, W2[32,8]).

    Prunable: the hidden 32 channels (W1 rows, bias, W2 rows).
    """
    b = Builder(seed)
    h = b.node("Gemm", "fc1", ["x", b.randn("fc1.weight", [32, 16], 0.25),
                                b.randn("fc1.bias", [32], 0.1)], transB=1)
    h = b.relu("relu1", h)
    b.output(b.node("Gemm", "fc2", [h, b.randn("fc2.weight", [32, 8], 1 / math.sqrt(32)),
                                    b.randn("fc2.bias", [8], 0.1)]))
    return b.model([("x", [4, 16])], name="mlp_gemm")


def blocked_einsum(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> Einsum("nchw,oc->nohw", h, W[4,8]) (a 1x1 conv spelled as Einsum).

    Blocked: Einsum has no handler.
    """
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    w = b.randn("einsum1.weight", [4, 8], 1 / math.sqrt(8))
    b.output(b.node("Einsum", "einsum1", [h, w], equation="nchw,oc->nohw"))
    return b.model(x_input(), name="blocked_einsum")


def blocked_scores(seed: int = 0) -> onnx.ModelProto:
    """x [1,5,16] -> q, k (16->16) -> MatMul(q, Transpose(k)): attention scores [1,5,5] as the output.

    Blocked: q's and k's channels are contracted with a computed operand.
    """
    b = Builder(seed)
    q, k = (b.matmul(name, "x", 16, 16) for name in ("q", "k"))
    b.output(b.node("MatMul", "scores", [q, b.node("Transpose", "k_t", [k], perm=[0, 2, 1])]))
    return b.model([("x", [1, 5, 16])], outputs=[("y", [1, 5, 5])], name="blocked_scores")


BUILDERS = {
    "flatten_gemm": flatten_gemm,
    "reshape_gemm": reshape_gemm,
    "reshape_gemm_literal": reshape_gemm_literal,
    "mlp": mlp,
    "mlp_gemm": mlp_gemm,
    "blocked_einsum": blocked_einsum,
    "blocked_scores": blocked_scores,
}
BLOCKED = {"blocked_einsum": "Einsum 'einsum1'", "blocked_scores": "channels are contracted with a computed operand"}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


def _gemm_model(a_shape, b_shape, **attrs) -> onnx.ModelProto:
    b = Builder(4)
    outputs = b_shape[0] if attrs.get("transB") else b_shape[1]
    ins = ["x", b.randn("layer.weight", b_shape, 0.3), b.randn("layer.bias", [outputs], 0.1)]
    b.output(b.node("Gemm", "layer", ins, **attrs))
    return b.model([("x", a_shape)])


@pytest.mark.parametrize("a_shape,b_shape,attrs", [
    ([4, 16], [16, 8], {}),
    ([4, 16], [8, 16], dict(transB=1, alpha=0.5, beta=2.0)),
    ([16, 4], [16, 8], dict(transA=1, alpha=1.5)),
])
def test_weight_layout_reproduces_the_gemm(a_shape, b_shape, attrs):
    check_weight_layout(_gemm_model(a_shape, b_shape, **attrs), "layer")


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_weight_layout_reproduces_the_matmul(name):
    check_weight_layout(mlp(), name)


def _macs(op, shapes, **attrs) -> int:
    return node_macs(helper.make_node(op, list(shapes)[:-1], [list(shapes)[-1]], **attrs), shapes, {})


def test_gemm_and_matmul_macs_are_output_elements_times_features():
    assert _macs("Gemm", {"a": (4, 16), "b": (32, 16), "y": (4, 32)}, transB=1) == 4 * 32 * 16
    assert _macs("Gemm", {"a": (16, 3), "b": (16, 32), "y": (3, 32)}, transA=1) == 3 * 32 * 16
    assert _macs("MatMul", {"a": (2, 5, 16), "b": (16, 8), "y": (2, 5, 8)}) == 2 * 5 * 8 * 16
    # attention scores: two computed operands count the same way
    assert _macs("MatMul", {"q": (1, 4, 10, 16), "k": (1, 4, 16, 10), "y": (1, 4, 10, 10)}) == 400 * 16
