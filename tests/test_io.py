"""Loading and saving: external data, models too big for one protobuf, old opsets, Constant weights."""

import numpy as np
import onnx
import pytest
from onnx import helper

import models
from onnxprune import PruneConfig, prune
from onnxprune import io
from onnxprune.loading import load


def test_external_data_model_prunes_and_runs(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save_model(models.residual(), str(source), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    result = prune(source, PruneConfig(filters=0.5))
    assert result.report["after"]["macs"] < result.report["before"]["macs"]
    assert result.report["before"]["size_bytes"] > source.stat().st_size  # the data file counts


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path, monkeypatch):
    """Above the threshold (2 GB in real life; lowered here) the output gets a .data file, and the
    checker and onnxruntime read the model from disk."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    import onnxprune.validate.checker as checker
    monkeypatch.setattr(checker, "EXTERNAL_DATA_THRESHOLD", 1000)
    result = prune(models.flatten_gemm(), PruneConfig(filters=0.5, round_to=1))
    assert any(t.ByteSize() > 1024 for t in result.model.graph.initializer)  # some tensor goes external
    out = tmp_path / "big.onnx"
    written = io.save_model(result.model, out)
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    reloaded = io.load_model(out)
    feed = models.random_input(reloaded)
    np.testing.assert_allclose(models.run(reloaded, feed)[0], models.run(result.model, feed)[0], rtol=1e-6)
    # the caller's model still holds its weights after saving
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in result.model.graph.initializer)


def test_old_opset_is_converted(tmp_path):
    model = models.conv_bn_relu()
    model.opset_import[0].version = 9
    model.ir_version = 4
    loaded = load(model)
    assert io.opset_version(loaded.model) >= io.MIN_OPSET
    result = prune(model, PruneConfig(filters=0.5))
    assert result.report["after"]["macs"] < result.report["before"]["macs"]


def test_constant_node_weights_are_folded():
    model = models.conv_bn_relu_constant_nodes()
    assert any(n.op_type == "Constant" for n in model.graph.node)
    loaded = load(model)
    assert not any(n.op_type == "Constant" for n in loaded.model.graph.node)
    report = prune(model, PruneConfig(filters=0.5)).report
    assert report["after"]["macs"] < report["before"]["macs"]


def test_old_exports_listing_weights_as_inputs():
    model = models.conv_chain()
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    model.ir_version = 3
    loaded = load(model)
    assert [i.name for i in loaded.model.graph.input] == ["x"]
    assert loaded.model.ir_version >= 4
    report = prune(model, PruneConfig(filters=0.5)).report
    assert report["after"]["params"] < report["before"]["params"]


def test_input_is_never_modified():
    model = models.residual()
    before = model.SerializeToString()
    prune(model, PruneConfig(filters=0.5))
    assert model.SerializeToString() == before


def test_computed_shapes_are_completed_by_onnxruntime():
    """A Slice bounded by Shape() of the input defeats ONNX shape inference; onnxruntime fills it in."""
    model = models.slice_()
    loaded = load(model)
    assert all(None not in loaded.shapes[o] for n in loaded.model.graph.node for o in n.output)
