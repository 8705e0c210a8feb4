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


def test_external_weights_are_read_through_memory_maps_and_prune_like_inline_ones(tmp_path):
    """External initializers stay out of the proto (memory maps of the data file, never loaded whole),
    the result equals pruning the same model held inline, and the output owns its data file."""
    model = models.residual()
    source = tmp_path / "ext.onnx"
    onnx.save_model(models.residual(), str(source), save_as_external_data=True, location="ext.data", size_threshold=0)
    loaded = io.load_model(source)
    external = [t for t in loaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(io.mapped(t) and not t.raw_data for t in external)
    constants = [c for c in io.import_graph(loaded).tensors().values() if c.name in {t.name for t in external}]
    assert constants and all(isinstance(c.values, np.memmap) for c in constants)

    mapped, inline = prune(source, PruneConfig(filters=0.5)), prune(model, PruneConfig(filters=0.5))
    assert mapped.plan.to_json() == inline.plan.to_json()
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    io.save_model(mapped.model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    saved = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"} == {"pruned.onnx.data"}
    feed = models.random_input(model)
    np.testing.assert_allclose(models.run(onnx.load(str(out)), feed)[0], models.run(inline.model, feed)[0], rtol=1e-5, atol=1e-6)


def test_a_tensor_over_the_protobuf_limit_is_mapped_and_runs(tmp_path):
    """A 2 GiB + 4 KiB initializer (a sparse file: no disk or memory spent) cannot be in any protobuf
    message: it is loaded as a map, sized, and run by onnxruntime from a link to its file (mapped, not
    copied: the session takes 0.03 s)."""
    count = (2**31 + 4096) // 4
    head = np.arange(8, dtype=np.float32)
    with open(tmp_path / "huge.data", "wb") as data:
        data.write(head.tobytes())
        data.truncate(count * 4)
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[count])
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="huge.data")
    graph = helper.make_graph([helper.make_node("Gather", ["w", "i"], ["y"])], "huge",  # not folded by onnxruntime
                              [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8])], [weight])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "huge.onnx"))

    model = io.load_model(tmp_path / "huge.onnx")
    values = io.tensor_array(model.graph.initializer[0])
    assert isinstance(values, np.memmap) and values.size == count and values[:8].tolist() == head.tolist()
    assert io.model_size_bytes(model) > 2**31
    from onnxprune.runtime import session

    np.testing.assert_array_equal(session(model).run(None, {"i": np.arange(8)})[0], head)


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path, monkeypatch):
    """Above the threshold (2 GB in real life; lowered here) the output gets a .data file, and the
    checker and onnxruntime read the model from disk."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    result = prune(models.flatten_gemm(), PruneConfig(filters=0.5, round_to=1))
    assert any(t.ByteSize() > 1024 for t in result.model.graph.initializer)  # some tensor goes external
    out = tmp_path / "big.onnx"
    written = io.save_model(result.model, out)
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    reloaded = onnx.load(str(out))
    feed = models.random_input(reloaded)
    np.testing.assert_allclose(models.run(reloaded, feed)[0], models.run(result.model, feed)[0], rtol=1e-6)
    # the caller's model still holds its weights after saving
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in result.model.graph.initializer)


def test_a_small_output_replacing_a_large_one_removes_its_data_file(tmp_path, monkeypatch):
    """out.onnx written with out.onnx.data, then overwritten by a model in one file: the old weights go;
    a data file the old output did not read is left alone."""
    result = prune(models.flatten_gemm(), PruneConfig(filters=0.5, round_to=1))
    out = tmp_path / "out.onnx"
    with monkeypatch.context() as patch:
        patch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
        assert [p.name for p in io.save_model(result.model, out)] == ["out.onnx", "out.onnx.data"]
    assert io.save_model(result.model, out) == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    (tmp_path / "out.onnx.data").write_bytes(b"someone else's")
    io.save_model(result.model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


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


def test_an_external_data_model_through_the_cli_and_a_mapped_one_in_the_first_run(tmp_path):
    """The CLI's first session (a child process) reads the user's file with its data file; a mapped model in
    memory goes to the child through a session folder (links to its data file) inside this run's folder.
    The input folder is left as it was, the output gets its own data file, no temporary file stays."""
    from click.testing import CliRunner

    from onnxprune import runtime, workdir
    from onnxprune.cli import main

    source = tmp_path / "in" / "ext.onnx"
    source.parent.mkdir()
    onnx.save_model(models.residual(), str(source), save_as_external_data=True, location="ext.data", size_threshold=0)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(main, [str(source), str(out), "--filters", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in source.parent.iterdir()) == ["ext.data", "ext.onnx"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]

    mapped = io.load_model(source)
    assert any(io.mapped(t) for t in mapped.graph.initializer)
    assert runtime.first_run(mapped, models.random_input(mapped)) is None
    assert not list(workdir.run_folder().glob("session-*")) and not list(workdir.run_folder().glob("first-run-*"))


def test_constants_computed_from_mapped_weights_are_folded_and_the_weights_mapped_again(tmp_path):
    """onnxruntime, which graphsurgeon's folding runs, refuses a mapped tensor's absolute location: the
    mapped weights the folded part reads are read into memory for the fold, then mapped again."""
    import onnx_graphsurgeon as gs

    b = models.Builder(seed=0)
    weight = b.randn("w", [32, 16])
    y = b.node("MatMul", "tied", ["x", b.node("Transpose", "t", [weight], perm=[1, 0])])
    b.output(b.node("MatMul", "plain", [y, weight]))
    path = tmp_path / "m.onnx"
    onnx.save(b.model([("x", [2, 16])]), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    graph = io.import_graph(io.load_model_file(path)[0])
    io.fold_constants(graph)
    tied, plain = graph.nodes
    assert [tied.op, plain.op] == ["MatMul", "MatMul"] and isinstance(tied.inputs[1], gs.Constant)
    assert isinstance(plain.inputs[1]._values, gs.ir.tensor.LazyValues)  # mapped again (read when asked for)
    np.testing.assert_array_equal(tied.inputs[1].values, np.asarray(plain.inputs[1].values).T)
