"""The graph work behind training artifacts that needs no onnxruntime-training: BatchNorm folding, ops
spelled out for their gradients, parameter selection, the gradient-op check and the teacher merge
(these run in every environment)."""

import numpy as np
import onnx
import pytest
from onnx import helper

import models
from onnxprune.errors import UsageError
from onnxprune.recover.training_graph import (TEACHER_PREFIX, decompose_for_training, dynamic_pool_inputs,
                                              fold_batchnorm, ops_without_gradient, restore_decomposed,
                                              teacher_for_training, trainable_parameters, with_input_shapes,
                                              with_teacher)
from onnxprune.runtime import session


def conv_bn_relu_gemm(seed=0, activation="Relu", batch="N"):
    """conv1 -> bn1 -> act -> conv2 (bias) -> bn2 -> Relu -> GlobalAveragePool -> Flatten -> fc (Gemm 8->4)."""
    b = models._Builder(seed)
    h = b.node(activation, "act1", [b.bn("bn1", b.conv("conv1", "x", 3, 8, bias=False), 8)])
    h = b.relu("relu2", b.bn("bn2", b.conv("conv2", h, 8, 8), 8))
    h = b.node("Flatten", "flatten", [b.node("GlobalAveragePool", "gap", [h])])
    fc = b.node("Gemm", "fc", [h, b.randn("fc.weight", [8, 4], 0.3), b.randn("fc.bias", [4], 0.1)])
    b.output(fc)
    return b.model([("x", [batch, 3, 8, 8])], name="conv_bn_relu_gemm")


def conv_pool_gemm(seed=0, pool="MaxPool", shape=("N", 3, "H", "W"), **pool_attrs):
    """conv1 -> bn1 -> Relu -> pool (2x2, stride 2 unless given) -> conv2 -> GlobalAveragePool -> Flatten
    -> fc (Gemm 8->4): the pooling of the PP-OCR models, whose gradients need static shapes."""
    b = models._Builder(seed)
    h = b.relu("relu1", b.bn("bn1", b.conv("conv1", "x", 3, 8), 8))
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2], **pool_attrs}
    h = b.relu("relu2", b.conv("conv2", b.node(pool, "pool", [h], **attrs), 8, 8))
    h = b.node("Flatten", "flatten", [b.node("GlobalAveragePool", "gap", [h])])
    b.output(b.node("Gemm", "fc", [h, b.randn("fc.weight", [8, 4], 0.3), b.randn("fc.bias", [4], 0.1)]))
    return b.model([("x", list(shape))], name="conv_pool_gemm")


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


def test_average_pool_becomes_a_depthwise_conv_for_training_and_comes_back():
    model = conv_pool_gemm(pool="AveragePool", shape=("N", 3, 12, 8), kernel_shape=[3, 2], strides=[3, 2])
    spelled, counts = decompose_for_training(model)
    assert counts == {"AveragePool": 1}
    conv = next(n for n in spelled.graph.node if n.name.startswith("pool/"))
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert conv.op_type == "Conv" and attrs["group"] == 8 and attrs["kernel_shape"] == [3, 2]
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(spelled, x), outputs(model, x), rtol=1e-5, atol=1e-6)
    trainable, _ = trainable_parameters(spelled)
    assert conv.input[1] not in trainable  # the constant 1/6 weights are not trained
    restored = restore_decomposed(spelled, model)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in model.graph.node]
    assert {t.name for t in restored.graph.initializer} == {t.name for t in model.graph.initializer}
    # partial windows (padding not counted, ceil_mode) would change the divisor: left as they are
    for attrs in ({"pads": [1, 1, 1, 1]}, {"ceil_mode": 1}):
        padded = conv_pool_gemm(pool="AveragePool", shape=("N", 3, 12, 8), kernel_shape=[3, 3], strides=[2, 2],
                                **attrs)
        assert decompose_for_training(padded)[1] == {}


def test_input_shapes_for_training_and_dynamic_pool_inputs():
    model = conv_pool_gemm()
    trainable, _ = trainable_parameters(model)
    found = dynamic_pool_inputs(model, trainable, ["y"])
    assert list(found) == ["MaxPool"] and found["MaxPool"][0] == "pool" and found["MaxPool"][1][2:] == ["?", "?"]
    fixed = with_input_shapes(model, {"x": [None, 3, 16, 24]})
    assert [d.dim_param or d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 16, 24]
    assert dynamic_pool_inputs(fixed, trainable, ["y"]) == {}  # a dynamic batch is fine for MaxPool
    assert dynamic_pool_inputs(model, trainable_parameters(model, ("conv1.*", "bn1.*"))[0], ["y"]) == {}
    # AveragePool's gradient needs the batch static too (unless it is spelled as a Conv)
    average = with_input_shapes(conv_pool_gemm(pool="AveragePool"), {"x": [None, 3, 16, 24]})
    assert list(dynamic_pool_inputs(average, trainable, ["y"])) == ["AveragePool"]
    assert dynamic_pool_inputs(decompose_for_training(average)[0], trainable, ["y"]) == {}


def test_negative_dims_become_named_dynamic_dims():
    """An exporter's -1 for "dynamic" (the PP-OCR direction classifier) is invalid ONNX; for training it is
    written as a named dim, and stale intermediate shapes are dropped."""
    model = conv_pool_gemm(shape=(2, 3, 8, 8))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    model.graph.value_info.append(helper.make_tensor_value_info("relu1_out", onnx.TensorProto.FLOAT, [-1, 8, 8, 8]))
    fixed = with_input_shapes(model, {})
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "x_dim0"
    assert fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "y_dim0"
    assert not fixed.graph.value_info and len(model.graph.value_info) == 1  # the input model is not modified
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(fixed, x), outputs(conv_pool_gemm(shape=("N", 3, 8, 8)), x), rtol=1e-6)
    with pytest.raises(UsageError, match="has 4 dims"):
        with_input_shapes(model, {"x": [3, 8, 8]})


def test_teacher_for_training_has_no_batchnorm_or_dropout():
    """onnxruntime-training runs every BatchNormalization of a training graph on batch statistics, the
    teacher's too: the teacher enters it folded, with Dropout as Identity, computing the same outputs."""
    b = models._Builder(0)
    h = b.relu("relu1", b.bn("bn1", b.conv("conv1", "x", 3, 8), 8))
    h = b.node("Dropout", "drop", [b.node("Flatten", "flatten", [b.node("GlobalAveragePool", "gap", [h])])])
    b.output(b.node("Gemm", "fc", [h, b.randn("fc.weight", [8, 4], 0.3)]))
    teacher = b.model([("x", ["N", 3, 8, 8])], name="dropout")
    prepared = teacher_for_training(teacher)
    assert {n.op_type for n in prepared.graph.node} == {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Identity",
                                                        "Gemm"}
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(prepared, x), outputs(teacher, x), rtol=1e-4, atol=1e-5)


def test_native_stderr_during_artifact_building_goes_to_the_debug_log(capfd, caplog):
    """onnxruntime-training's C++ passes write to fd 2 at info level: not on the user's terminal, in the log."""
    import logging
    import os

    from onnxprune.recover.training import native_stderr_logged

    with caplog.at_level(logging.DEBUG, logger="onnxprune.recover.training"):
        with native_stderr_logged():
            os.write(2, b"GraphTransformer ConstantFolding modified: 0\n")
    assert "ConstantFolding" not in capfd.readouterr().err
    assert "ConstantFolding" in caplog.text
    os.write(2, b"after\n")  # fd 2 is the terminal's again
    assert "after" in capfd.readouterr().err
