"""Hostile or broken attributes and models onnxruntime refuses or crashes on: a one-line exit-3 error naming
what is wrong, before any onnxruntime session of the parent process (onnxprune/vetting.py,
runtime.first_run)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.cli import main
from onnxprune.errors import ModelError
from onnxprune.runtime import first_run
from tests.builders import Builder

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *phrases):
    assert result.exit_code == 3, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


def conv_pool(**conv_attrs) -> onnx.ModelProto:
    b = Builder()
    y = b.conv("conv1", "x", 3, 8)
    for node in b.nodes:
        for attr in node.attribute:
            if attr.name in conv_attrs:
                attr.CopyFrom(helper.make_attribute(attr.name, conv_attrs[attr.name]))
    y = b.node("MaxPool", "pool", [b.relu("relu1", y)], kernel_shape=[3, 3])
    b.output(b.conv("conv2", y, 8, 4))
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("attrs, phrase", [
    ({"strides": [0, 0]}, "strides [0, 0] must be positive"),
    ({"kernel_shape": [0, 0]}, "kernel_shape [0, 0] must be positive"),
    ({"group": 0}, "group 0 must be positive"),
    ({"group": 2}, "group 2 does not divide its 3 input channels"),
    ({"pads": [-4, -4, -4, -4]}, "must not be negative"),
    ({"strides": [1000000, 1000000]}, "MaxPool 'pool': its output would be empty"),  # SIGFPE in onnxruntime
    ({"pads": [1000000] * 4}, "more than half the"),  # killed for memory
])
def test_hostile_attributes_are_refused_by_name(tmp_path, attrs, phrase):
    path = tmp_path / "hostile.onnx"
    onnx.save(conv_pool(**attrs), str(path))
    before = path.read_bytes()
    assert_refused(run(path, tmp_path / "out.onnx"), phrase)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["hostile.onnx"]


def test_a_model_onnxruntime_refuses_is_the_models_fault(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 4)), "w")  # float64 against a float32 input
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    assert_refused(run(path, tmp_path / "out.onnx"), "onnxruntime cannot load the model", "tensor(double)")


def test_a_native_crash_in_the_first_session_is_one_line(monkeypatch):
    monkeypatch.setattr(runtime, "_FIRST_RUN", "import os, signal; print('run', flush=True); "
                                               "os.kill(os.getpid(), signal.SIGFPE)")
    with pytest.raises(ModelError, match=r"onnxruntime crashed \(SIGFPE\) running the model once"):
        first_run(conv_pool(), {"x": np.zeros((1, 3, 16, 16), np.float32)})


def test_the_first_session_imports_from_this_process_path(tmp_path, monkeypatch):
    """The child runs isolated (-I drops PYTHONPATH), so it gets this process's import path: an onnxruntime
    found only on PYTHONPATH must not make every model 'broken'. Here the path holds a stand-in that fails."""
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("raise ImportError('the stand-in on the path')")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="the stand-in on the path"):
        first_run(conv_pool(), {"x": np.zeros((1, 3, 16, 16), np.float32)})


def test_the_first_session_survives_a_real_sigfpe(tmp_path):
    """Unvetted, SqueezeNet with a Conv stride of 1000000 kills onnxruntime with SIGFPE (exit 136)."""
    model = onnx.load(str(LIGHT / "light_squeezenet.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "strides").ints[:] = [1000000, 1000000]
    with pytest.raises(ModelError, match="SIGFPE"):
        first_run(model, {"data_0": np.zeros((1, 3, 224, 224), np.float32)})


@pytest.mark.parametrize("external", [False, True])
def test_nan_weights_are_refused_by_name(tmp_path, external):
    """In the proto, or in an external data file (memory-mapped, read in slices)."""
    model = conv_pool()
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[3] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path = tmp_path / "nan.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external, location="nan.data", size_threshold=0)
    assert_refused(run(path, tmp_path / "out.onnx"), f"weight '{weight.name}' holds 1 NaN values")


def test_an_attribute_of_no_known_type_is_refused_by_name(tmp_path):
    """Bits flipped in a Conv's `group` attribute left it of no type (TypeError, exit 4; fuzz seed 1638)."""
    model = conv_pool(group=1)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "group").type = onnx.AttributeProto.UNDEFINED
    path = tmp_path / "untyped_attribute.onnx"
    onnx.save(model, str(path))
    assert_refused(run(path, tmp_path / "out.onnx"), "attribute 'group' holds no value of a known type")


def test_a_constant_of_terabytes_is_refused_not_allocated(tmp_path):
    shape = numpy_helper.from_array(np.array([10**6, 10**6, 3, 3], np.int64), "w_shape")
    nodes = [helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="make_w"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    assert_refused(run(path, tmp_path / "out.onnx"), "tensor 'w', computed by ConstantOfShape 'make_w' (1000000x1000000x3x3), would take 3.35e+04 GB")


def test_a_model_input_of_terabytes_is_refused_before_data_is_made(tmp_path):
    """A fixed input dim of 10^8 channels: the synthetic sample for the first session was allocated first
    (MemoryError, exit 4; fuzz seed 457)."""
    model = conv_pool()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 10**8
    path = tmp_path / "wide_input.onnx"
    onnx.save(model, str(path))
    assert_refused(run(path, tmp_path / "out.onnx"), "tensor 'x', a model input (1x100000000x16x16), would take")


def test_a_weight_shorter_than_its_dims_is_refused_by_name(tmp_path):
    model = conv_pool()
    model.graph.initializer[0].dims[1] = 9  # 8x3x3x3 values, declared 8x9x3x3
    path = tmp_path / "short.onnx"
    onnx.save(model, str(path))
    assert_refused(run(path, tmp_path / "out.onnx"), f"weight '{model.graph.initializer[0].name}' does not hold "
                                                     "the values its dims (8x9x3x3) say")


def test_the_original_failing_on_its_data_is_the_models_fault(tmp_path):
    model = conv_pool()
    bias = next(t for t in model.graph.initializer if t.name == "conv1.bias")
    bias.dims[:] = [8, 1]  # the same 8 values as a 2-D bias: the checker passes it, onnxruntime's Conv fails
    path = tmp_path / "bias.onnx"
    onnx.save(model, str(path))
    assert_refused(run(path, tmp_path / "out.onnx"), "onnxruntime cannot run the model on the synthetic data",
                   "bias must be a 1D tensor", "fix or re-export it")


@pytest.mark.parametrize("command", ["prune", "inspect"])
@pytest.mark.parametrize("break_it, phrase", [
    (lambda nodes: nodes[0].input.__setitem__(0, nodes[-1].output[0]), "is on a cycle"),
    (lambda nodes: nodes[1].input.__setitem__(0, "nowhere"), "reads 'nowhere', which no node"),
    (lambda nodes: nodes[-1].output.__setitem__(0, nodes[0].output[0]), "is written by"),
])
def test_a_broken_graph_is_refused_by_name(tmp_path, command, break_it, phrase):
    model = conv_pool()
    break_it(model.graph.node)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    args = [path, tmp_path / "out.onnx"] if command == "prune" else ["inspect", path]
    assert_refused(run(*args), phrase)
