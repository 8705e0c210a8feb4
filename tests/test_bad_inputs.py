"""Bad input: a one-line error, the right exit code, the input untouched and no output left behind."""

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_failed(result, code, *phrases):
    assert result.exit_code == code, result.output
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message


def no_output_in(directory: Path, keep=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep) == []


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    assert_failed(run(bad, tmp_path / "out.onnx"), 3, "not a readable ONNX model")
    assert no_output_in(tmp_path, keep={"notes.onnx"})


def test_truncated_model(tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    assert_failed(run(cut, tmp_path / "out.onnx"), 3, "ONNX")
    assert no_output_in(tmp_path, keep={"cut.onnx"})


def test_missing_external_data(tmp_path):
    model = onnx.load(str(MODEL))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert_failed(run(path, tmp_path / "out.onnx"), 3, "external data file 'ext.onnx.data'", "missing")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1"])
def test_ratio_outside_range(tmp_path, ratio):
    result = run(MODEL, tmp_path / "out.onnx", "--filters", ratio)
    assert result.exit_code == 2
    assert "--filters" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_nothing_prunable(tmp_path):
    path = tmp_path / "blocked.onnx"
    onnx.save(models.blocked_graph_output(), str(path))
    assert_failed(run(path, tmp_path / "out.onnx"), 3, "nothing to prune", "onnxprune inspect")
    assert not (tmp_path / "out.onnx").exists()


def test_unwritable_output_directory(tmp_path, monkeypatch):
    assert_failed(run(MODEL, tmp_path / "missing" / "out.onnx"), 2, "does not exist")
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    # CI runs as root, who may write anywhere: simulate the permission check failing.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert_failed(run(MODEL, locked / "out.onnx"), 2, "permission denied")
    assert list(locked.iterdir()) == []


def test_output_path_is_a_directory(tmp_path):
    assert_failed(run(MODEL, tmp_path), 2, "is a directory")


def test_output_is_the_input(tmp_path):
    copy = tmp_path / "m.onnx"
    shutil.copy(MODEL, copy)
    before = copy.read_bytes()
    assert_failed(run(copy, copy), 2, "is the input model")
    assert_failed(run(copy, tmp_path / "." / "m.onnx"), 2, "is the input model")
    assert copy.read_bytes() == before


def test_dynamic_input_without_input_shape(tmp_path):
    model = models.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    assert_failed(run(path, tmp_path / "out.onnx"), 2, "dynamic dimension 2", "--input-shape x:1x3x1x")
    result = run(path, tmp_path / "out.onnx", "--input-shape", "x:1x3x16x16")
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert out.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "height"  # stays dynamic


def test_bad_input_shape_text(tmp_path):
    assert_failed(run(MODEL, tmp_path / "o.onnx", "--input-shape", "input:1xAx28"), 2, "NAME:DIMS")
    assert_failed(run(MODEL, tmp_path / "o.onnx", "--input-shape", "nope:1x1x28x28"), 2, "unknown input")


def test_missing_input_file(tmp_path):
    assert_failed(run(tmp_path / "none.onnx", tmp_path / "o.onnx"), 2, "does not exist")


def test_failure_during_save_leaves_nothing(tmp_path, monkeypatch):
    import onnxprune.io as io

    def broken(model, path, copy_mapped=False):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_model", broken)
    assert_failed(run(MODEL, tmp_path / "out.onnx"), 2, "cannot write", "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def external_data_at(tmp_path: Path, location: str) -> Path:
    """The MNIST model in tmp_path/model/ with its weights in a data file at `location` (set by hand)."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "ext.onnx"
    onnx.save_model(onnx.load(str(MODEL)), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("where, phrase", [("absolute", "an absolute path"), ("outside", "outside the model's folder"),
                                           ("symlink", "a symbolic link"), ("folder", "not a regular file")])
def test_refused_external_data_paths_say_why(tmp_path, where, phrase):
    location = {"absolute": str(tmp_path / "model" / "ext.data"), "outside": "../ext.data", "symlink": "link.data",
                "folder": "folder.data"}[where]
    path = external_data_at(tmp_path, location)
    shutil.copy(path.parent / "ext.data", tmp_path / "ext.data")  # what "../ext.data" names: it exists
    if where == "symlink":
        (path.parent / "link.data").symlink_to(path.parent / "ext.data")
    if where == "folder":
        (path.parent / "folder.data").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run(path, tmp_path / "out.onnx")
    assert_failed(result, 3, f"is at '{location}', {phrase}")
    assert "truncated" not in result.output and "corrupt" not in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_truncated_external_data_file_is_called_so(tmp_path):
    path = external_data_at(tmp_path, "ext.data")
    data = path.parent / "ext.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_failed(run(path, tmp_path / "out.onnx"), 3, "truncated")
    assert not (tmp_path / "out.onnx").exists()


def test_a_usage_error_is_one_line(tmp_path):
    result = run(MODEL, tmp_path / "out.onnx", "--calib-batch", "0")
    assert_failed(result, 2, "--calib-batch", "--help")
    assert no_output_in(tmp_path)


@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_an_input_of_no_element_type(tmp_path, command):
    model = onnx.load(str(MODEL))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
    path = tmp_path / "untyped.onnx"
    onnx.save(model, str(path))
    args = [path, tmp_path / "out.onnx"] if command == "prune" else ["inspect", path]
    assert_failed(run(*args), 3, "input 'input' is not a tensor of a known element type")
    assert no_output_in(tmp_path, keep={"untyped.onnx"})


def test_a_negative_seed_is_a_usage_error(tmp_path):
    from onnxprune import PruneConfig, prune
    from onnxprune.config import check_config
    from onnxprune.errors import UsageError

    assert_failed(run(MODEL, tmp_path / "out.onnx", "--seed", "-5"), 2, "--seed")
    for seed in (-5, 1.5, True):
        with pytest.raises(UsageError, match=f"--seed {seed}"):
            prune(str(MODEL), PruneConfig(seed=seed))
    check_config(PruneConfig(seed=__import__("numpy").int64(3)))  # a numpy integer is an integer
    assert no_output_in(tmp_path)


@pytest.mark.parametrize("key, value", [("offset", "abc"), ("offset", "-8"), ("length", "12x")])
def test_an_external_data_offset_or_length_that_is_no_number_is_the_models_fault(tmp_path, key, value):
    path = external_data_at(tmp_path, "ext.data")
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data.add(key=key, value=value)
    onnx.save(model, str(path))
    assert_failed(run(path, tmp_path / "out.onnx"), 3, "negative or not a number", model.graph.initializer[0].name)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("where, phrase", [("absolute", "an absolute path"), ("outside", "outside the model's folder")])
def test_a_constant_nodes_external_data_path_is_refused_like_a_weights(tmp_path, where, phrase):
    """External data in a node attribute (a Constant's value) is checked as an initializer's is: an absolute
    path is not taken for one of our memory maps, one outside the folder is not called a corrupt file."""
    from onnx import TensorProto, helper

    (tmp_path / "model").mkdir()
    (tmp_path / "c.data").write_bytes(bytes(64 * 32 * 4))
    location = str(tmp_path / "c.data") if where == "absolute" else "../c.data"
    value = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[64, 32], data_location=TensorProto.EXTERNAL)
    value.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Constant", [], ["w"], value=value),
                               helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])])
    path = tmp_path / "model" / "const.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    result = run(path, tmp_path / "out.onnx")
    assert_failed(result, 3, f"is at '{location}', {phrase}")
    assert "corrupt" not in result.output and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("output", ["ext.onnx", "ext.data"])
def test_an_output_that_would_overwrite_the_inputs_external_data_is_refused(tmp_path, output):
    """out.onnx writes out.onnx.data beside it: when the input's weights live in that file (or OUT names the
    data file itself), the run is refused before any work, the input's data untouched."""
    data = "ext.onnx.data" if output == "ext.onnx" else "ext.data"
    path = external_data_at(tmp_path, data)
    (path.parent / "ext.data").rename(path.parent / data)
    model = path.parent / "model.onnx"
    path.rename(model)
    before = {p.name: p.read_bytes() for p in model.parent.iterdir()}
    assert_failed(run(model, model.parent / output), 2, "the input model's external data")
    assert {p.name: p.read_bytes() for p in model.parent.iterdir()} == before


def test_a_model_in_onnxruntimes_machine_specific_layout_is_refused(tmp_path):
    """onnxruntime saves a model optimized at ORT_ENABLE_ALL with its Convs in its blocked channel layout
    (domain com.microsoft.nchwc, filters stored in blocks): refused before anything is cut (it crashed
    onnxruntime, or gave a wrong model, when its Convs were read as ONNX's)."""
    import onnxruntime as ort

    plain = tmp_path / "plain.onnx"
    onnx.save(models.conv_chain(), str(plain))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "blocked.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    if not any(n.domain == "com.microsoft.nchwc" for n in onnx.load(str(tmp_path / "blocked.onnx")).graph.node):
        pytest.skip("onnxruntime does not use its blocked layout on this CPU")
    assert_failed(run(tmp_path / "blocked.onnx", tmp_path / "out.onnx", "--filters", "0.3"), 3,
                  "com.microsoft.nchwc", "prune the model as exported")
    assert no_output_in(tmp_path, keep={"plain.onnx", "blocked.onnx"})


def fixed_batch_model(tmp_path, batch: int = 3) -> Path:
    model = models.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    path = tmp_path / f"batch{batch}.onnx"
    onnx.save(model, str(path))
    return path


def calib_file(tmp_path, count: int) -> Path:
    path = tmp_path / f"calib{count}.npy"
    np.save(path, np.random.default_rng(0).standard_normal((count, 3, 16, 16)).astype(np.float32))
    return path


@pytest.mark.parametrize("batch", [3, 9])
def test_a_fixed_batch_that_does_not_divide_the_synthetic_samples_still_runs(tmp_path, batch):
    result = run(fixed_batch_model(tmp_path, batch), tmp_path / "out.onnx", "--filters", "0.5", "--scorer", "l1")
    assert result.exit_code == 0, result.output
    assert f"{-(-8 // batch) * batch} synthetic samples" in result.output


def test_calibration_samples_that_fill_no_whole_batch_say_how_many_to_give(tmp_path):
    path = fixed_batch_model(tmp_path)
    assert_failed(run(path, tmp_path / "out.onnx", "--calib", calib_file(tmp_path, 10)), 3,
                  "10 samples", "fixed at 3", "--calib-samples 9")
    assert no_output_in(tmp_path, keep={path.name, "calib10.npy"})
    result = run(path, tmp_path / "out.onnx", "--calib", calib_file(tmp_path, 10), "--calib-samples", "9")
    assert result.exit_code == 0, result.output
    assert_failed(run(path, tmp_path / "out2.onnx", "--calib", calib_file(tmp_path, 2)), 3, "at least 3")


def test_evaluation_samples_that_fill_no_whole_batch_are_refused_too(tmp_path):
    path = fixed_batch_model(tmp_path)
    assert_failed(run(path, tmp_path / "out.onnx", "--calib", calib_file(tmp_path, 9), "--eval", calib_file(tmp_path, 10)),
                  3, "calib10.npy has 10 samples", "fixed at 3")
    assert not (tmp_path / "out.onnx").exists()
