"""The graph work behind training artifacts that needs no onnxruntime-training: BatchNorm folding, ops
spelled out for their gradients, parameter selection, the gradient-op check and the teacher merge
(these run in every environment)."""

import numpy as np
import onnx
import pytest
from onnx import helper

import models
from onnxprune.recover.training_graph import (TEACHER_PREFIX, decompose_for_training, fold_batchnorm,
                                              ops_without_gradient, restore_decomposed, trainable_parameters,
                                              with_teacher)
from onnxprune.validate import session


def conv_bn_relu_gemm(seed=0, activation="Relu", batch="N"):
    """conv1 -> bn1 -> act -> conv2 (bias) -> bn2 -> Relu -> GlobalAveragePool -> Flatten -> fc (Gemm 8->4)."""
    b = models._Builder(seed)
    h = b.node(activation, "act1", [b.bn("bn1", b.conv("conv1", "x", 3, 8, bias=False), 8)])
    h = b.relu("relu2", b.bn("bn2", b.conv("conv2", h, 8, 8), 8))
    h = b.node("Flatten", "flatten", [b.node("GlobalAveragePool", "gap", [h])])
    fc = b.node("Gemm", "fc", [h, b.randn("fc.weight", [8, 4], 0.3), b.randn("fc.bias", [4], 0.1)])
    b.output(fc)
    return b.model([("x", [batch, 3, 8, 8])], name="conv_bn_relu_gemm")


def outputs(model, x):
    return session(model).run(None, {"x": x})[0]


def test_batchnorm_folding_keeps_the_outputs():
    model = conv_bn_relu_gemm()
    before = model.SerializeToString()
    folded, count = fold_batchnorm(model)
    assert count == 2
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(folded, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(folded, full_check=True)
    assert model.SerializeToString() == before  # the input model is not modified


def test_batchnorm_after_a_shared_conv_becomes_mul_add():
    b = models._Builder(0)
    h = b.conv("conv1", "x", 3, 8)
    left = b.bn("bn1", h, 8)
    b.output(b.node("Add", "add", [left, h]))  # conv1's output also feeds the Add: no fold into conv1
    shared = b.model([("x", [1, 3, 8, 8])], name="shared")
    folded, count = fold_batchnorm(shared)
    assert count == 1
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mul", "Add", "Add"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(folded, x), outputs(shared, x), rtol=1e-4, atol=1e-5)


def test_trainable_parameters_skip_statistics_and_honour_frozen_patterns():
    model = conv_bn_relu_gemm()
    trainable, frozen = trainable_parameters(model)
    assert set(trainable) == {"conv1.weight", "bn1.scale", "bn1.bias", "conv2.weight", "conv2.bias", "bn2.scale",
                              "bn2.bias", "fc.weight", "fc.bias"}
    assert frozen == []
    trainable, frozen = trainable_parameters(model, ("conv1.*", "bn1.*"))
    assert set(frozen) == {"conv1.weight", "bn1.scale", "bn1.bias"}
    assert "conv1.weight" not in trainable and "fc.weight" in trainable


def test_ops_without_gradient_are_listed_only_between_parameters_and_loss():
    model = conv_bn_relu_gemm(activation="HardSwish")
    trainable, _ = trainable_parameters(model)
    assert list(ops_without_gradient(model, trainable, ["y"])) == ["HardSwish"]
    assert ops_without_gradient(model, trainable, ["y"])["HardSwish"] == "act1"
    # frozen layers before the HardSwish: no gradient has to flow through it
    trainable, _ = trainable_parameters(model, ("conv1.*", "bn1.*"))
    assert ops_without_gradient(model, trainable, ["y"]) == {}
    assert ops_without_gradient(conv_bn_relu_gemm(), trainable_parameters(conv_bn_relu_gemm())[0], ["y"]) == {}


def test_teacher_is_merged_beside_the_student_on_the_same_inputs():
    student, teacher = conv_bn_relu_gemm(seed=1), conv_bn_relu_gemm(seed=2)
    merged = with_teacher(student, teacher)
    onnx.checker.check_model(merged, full_check=True)
    assert [i.name for i in merged.graph.input] == ["x"]
    names = {o for n in merged.graph.node for o in n.output}
    assert TEACHER_PREFIX + "y" in names and "y" in names
    probe = onnx.ModelProto()
    probe.CopyFrom(merged)
    probe.graph.output.append(helper.make_empty_tensor_value_info(TEACHER_PREFIX + "y"))
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    student_out, teacher_out = session(probe).run(None, {"x": x})
    np.testing.assert_allclose(student_out, outputs(student, x), rtol=1e-5)
    np.testing.assert_allclose(teacher_out, outputs(teacher, x), rtol=1e-5)


def test_a_teacher_with_other_inputs_is_refused():
    from onnxprune.errors import UsageError

    other = conv_bn_relu_gemm()
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if n == "x" else n for n in node.input]
    with pytest.raises(UsageError, match="teacher's input 'image'"):
        with_teacher(conv_bn_relu_gemm(), other)


def layer_norm_model(opset):
    b = models._Builder(0, opset=opset)
    h = b.matmul("fc1", "x", 16, 32)
    h = b.node("LayerNormalization", "ln", [h, b.randn("ln.scale", [32]), b.randn("ln.bias", [32])], epsilon=1e-5)
    h = b.node("HardSigmoid", "hsig", [h], alpha=0.3, beta=0.4)
    b.output(b.matmul("fc2", b.node("HardSwish", "hswish", [h]), 32, 8))
    return b.model([("x", [2, 5, 16])], name="layer_norm", opset=opset)


@pytest.mark.parametrize("opset", [17, 18])
def test_spelled_out_ops_compute_the_same_and_come_back(opset):
    model = layer_norm_model(opset)
    spelled, counts = decompose_for_training(model)
    assert counts == {"LayerNormalization": 1, "HardSigmoid": 1, "HardSwish": 1}
    assert not {"LayerNormalization", "HardSigmoid", "HardSwish"} & {n.op_type for n in spelled.graph.node}
    onnx.checker.check_model(spelled, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(outputs(spelled, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    trainable, _ = trainable_parameters(spelled)
    assert {"ln.scale", "ln.bias"} <= set(trainable)
    assert ops_without_gradient(spelled, trainable, ["y"]) == {}
    restored = restore_decomposed(spelled, model)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in model.graph.node]
    assert {t.name for t in restored.graph.initializer} == {t.name for t in model.graph.initializer}
    np.testing.assert_allclose(outputs(restored, x), outputs(model, x), rtol=1e-6)


def test_clip_before_opset_12_becomes_min_and_max():
    b = models._Builder(0, opset=11)
    h = b.node("Clip", "clip", [b.matmul("fc1", "x", 8, 8), b.const("low", 0.0), b.const("high", 0.5)])
    b.output(b.matmul("fc2", h, 8, 4))
    model = b.model([("x", [3, 8])], name="clip11", opset=11)
    spelled, counts = decompose_for_training(model)
    assert counts == {"Clip": 1} and {"Min", "Max"} <= {n.op_type for n in spelled.graph.node}
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(outputs(spelled, x), outputs(model, x))
    assert [n.op_type for n in restore_decomposed(spelled, model).graph.node] == ["MatMul", "Clip", "MatMul"]
