"""Fidelity that shows the damage: per-channel errors of every output, the worst channel on the
terminal and as a gate, the channel axis override, held-out figures and the no-data message."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from onnxprune import PruneConfig, prune
from onnxprune.calib import CalibrationSet
from onnxprune.calib.data import HOLD_OUT_EVERY
from onnxprune.cli import main
from onnxprune.recover import lstsq, passes
from onnxprune.runtime import session
from onnxprune.sweep import settings_grid, sweep
from onnxprune.validate import compare
from onnxprune.validate.compare import channel_errors, error_sums, output_fidelity

BOXES = 4  # the large-valued channels of models.mixed_scale_head, before its 18 small-valued ones


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "head.onnx"
    onnx.save(models.mixed_scale_head(), str(path))
    return path


@pytest.fixture(scope="module")
def nhwc_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("nhwc") / "nhwc.onnx"
    onnx.save(models.mixed_scale_head(nhwc=True), str(path))
    return path


def test_channel_errors_are_per_slice_along_the_axis():
    reference = np.array([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # [2 samples, 2 channels, 2]
    result = reference.copy()
    result[:, 1] *= 2  # channel 1 doubled: error 1; channel 0 untouched
    np.testing.assert_allclose(channel_errors(error_sums(reference, result, 1)), [0.0, 1.0])
    # along the last axis each slice mixes both channels: norms of the differences 1 and 1, of the
    # references sqrt(3^2 + 1^2) and sqrt(4^2 + 1^2)
    np.testing.assert_allclose(channel_errors(error_sums(reference, result, 2)), [np.sqrt(1 / 10), np.sqrt(1 / 17)])
    # a channel whose reference is all zeros: its absolute error
    np.testing.assert_allclose(channel_errors(error_sums(np.zeros((1, 2)), np.array([[0.0, 0.5]]), 1)), [0.0, 0.5])
    # an axis counted from the end is the same axis
    np.testing.assert_allclose(channel_errors(error_sums(reference, result, -1)), [np.sqrt(1 / 10), np.sqrt(1 / 17)])


def test_an_output_without_samples_has_no_error():
    """A detector's boxes may be [0, 4] on every calibration sample: nothing differs, nothing crashes."""
    empty = np.zeros((0, 4), np.float32)
    figures = output_fidelity(empty, empty.copy())
    assert figures["rel_l2"] == 0.0 and figures["max_abs_diff"] == 0.0 and figures["cosine"] == 1.0
    assert figures["channels"]["count"] == 4
    assert error_sums(np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)).difference == 0.0


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_figures_taken_a_few_samples_at_a_time_are_those_of_the_whole_output(monkeypatch, axis):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((7, 3, 5)).astype(np.float32)
    result = reference + 0.1 * rng.standard_normal(reference.shape).astype(np.float32)
    whole = output_fidelity(reference, result, axis)
    monkeypatch.setattr(compare, "CHUNK_ELEMENTS", 20)  # 1 sample (15 values) per chunk: 7 chunks
    chunked = output_fidelity(reference, result, axis)
    a, b = reference.astype(np.float64), result.astype(np.float64)
    assert chunked["cosine"] == pytest.approx(np.vdot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    assert chunked["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-12)
    assert chunked["max_abs_diff"] == np.abs(a - b).max()
    channel = 1 if axis is None else axis
    expected = np.linalg.norm(np.moveaxis(a - b, channel, 0).reshape(a.shape[channel], -1), axis=1) / \
        np.linalg.norm(np.moveaxis(a, channel, 0).reshape(a.shape[channel], -1), axis=1)
    np.testing.assert_allclose(channel_errors(error_sums(reference, result, channel)), expected, rtol=1e-12)
    assert chunked["channels"]["worst"] == whole["channels"]["worst"]
    assert chunked["channels"]["count"] == a.shape[channel]


def test_a_nan_in_any_chunk_shows_in_the_figures(monkeypatch):
    monkeypatch.setattr(compare, "CHUNK_ELEMENTS", 4)
    reference = np.ones((5, 4), np.float32)
    result = reference.copy()
    result[3, 1] = np.nan  # in the fourth of five chunks: a running max() would drop it
    figures = output_fidelity(reference, result)
    assert np.isnan(figures["max_abs_diff"]) and np.isnan(figures["rel_l2"])
    assert np.isnan(compare._spread(result))  # (constant_over_samples' threshold is NaN too: it alone cannot tell)


def test_the_whole_output_hides_a_destroyed_block_the_channels_show_it(tmp_path, head_path):
    report_path, summary = tmp_path / "r.json", tmp_path / "summary.md"
    result = invoke(head_path, tmp_path / "out.onnx", "--filters", "0.5", "--report", report_path,
                    "--summary-md", summary)
    assert result.exit_code == 0, result.output
    fid = json.loads(report_path.read_text())["fidelity"]["per_output"]["y"]
    assert fid["cosine"] > 0.999 and fid["rel_l2"] < 0.01  # the box channels dominate the whole output
    channels = fid["channels"]
    assert channels["axis"] == 1 and channels["count"] == BOXES + 18
    worst = channels["worst"][0]
    assert worst["index"] >= BOXES and worst["rel_l2"] > 0.5  # a class channel, destroyed
    assert all(c["index"] >= BOXES for c in channels["worst"])  # the box channels are untouched
    assert channels["median"] > 0.2
    assert f"worst channel: y[{worst['index']}] rel. error {worst['rel_l2']:.2f} (the whole output: 0.00)" \
        in result.output
    assert f"Worst channel: y[{worst['index']}] rel. error {worst['rel_l2']:.2f}" in summary.read_text()


def test_the_channel_gate_fails_with_exit_1_and_writes_nothing(tmp_path, head_path):
    out = tmp_path / "out.onnx"
    result = invoke(head_path, out, "--filters", "0.5", "--max-channel-error", "0.3", "--report", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    assert not out.exists()
    check, = json.loads((tmp_path / "r.json").read_text())["gates"]["checks"]
    assert check["gate"] == "max_channel_error" and check["value"] > 0.5 and not check["passed"]
    assert "FAILED    --max-channel-error 0.3: relative L2 error of channel" in result.output
    assert "NOT WRITTEN because a gate failed" in result.output


def test_the_channel_gate_passes_above_the_worst_channel(tmp_path, head_path):
    out = tmp_path / "out.onnx"
    result = invoke(head_path, out, "--filters", "0.5", "--max-channel-error", "100")
    assert result.exit_code == 0, result.output
    assert out.exists() and "gates     PASSED: 1 of 1" in result.output


def test_an_nhwc_output_needs_its_axis_named(tmp_path, nhwc_path):
    def worst(*extra):
        report_path = tmp_path / "r.json"
        result = invoke(nhwc_path, tmp_path / "out.onnx", "--filters", "0.5", "--report", report_path, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(report_path.read_text())["fidelity"]["channels"], result.output

    rows, _ = worst()  # axis 1 is the image rows: each mixes both blocks, and the damage is diluted
    assert rows["axis"] == 1 and rows["count"] == 8 and rows["worst"][0]["rel_l2"] < 0.05
    channels, output = worst("--output-axis", "y:3")
    assert channels["axis"] == 3 and channels["count"] == BOXES + 18
    assert channels["worst"][0]["index"] >= BOXES and channels["worst"][0]["rel_l2"] > 0.5
    assert "worst channel: y[" in output
    negative, _ = worst("--output-axis", "y:-1")
    assert negative == channels


@pytest.mark.parametrize("axis, message", [("z:1", "unknown output(s) ['z']"), ("y:4", "y has 4 axes"),
                                           ("y:last", "is not NAME:AXIS"), ("y:1 y:3", "names y twice")])
def test_a_bad_output_axis_is_refused_before_any_work(tmp_path, nhwc_path, axis, message):
    out = tmp_path / "out.onnx"
    options = [arg for text in axis.split() for arg in ("--output-axis", text)]
    result = invoke(nhwc_path, out, *options)
    assert result.exit_code == 2 and message in result.output and not out.exists()
    assert len(result.output.strip().splitlines()) == 1


def test_the_sweep_table_has_the_worst_channel_beside_the_cosine(tmp_path, head_path):
    table_path = tmp_path / "sweep.json"
    result = invoke("sweep", head_path, "--filters", "0.25,0.5", "--no-sensitivity", "--report", table_path)
    assert result.exit_code == 0, result.output
    light, heavy = json.loads(table_path.read_text())["settings"]
    assert heavy["cosine"] > 0.999 and heavy["worst_channel_error"] > 0.5
    assert light["worst_channel_error"] < heavy["worst_channel_error"]
    assert "worst ch." in result.output and f"{heavy['cosine']:.4f}{heavy['worst_channel_error']:>10.4f}" in result.output


def test_a_run_without_data_says_it_was_checked_on_synthetic_inputs_only(tmp_path, head_path):
    out = tmp_path / "out.onnx"
    result = invoke(head_path, out, "--filters", "0.5")
    assert result.exit_code == 0 and out.exists()
    assert "measured on 8 synthetic samples only: the model was not checked on real inputs and may be broken" \
        in result.output
    how, = [line for line in result.output.splitlines() if "--calib" in line]  # one line says how to give data
    assert "--calib DIR --preprocess imagenet" in how and ".npz" in how and "--data-loader-script" in how


# ---------------------------------------------------------------- held-out fidelity

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_resnet.onnx"
MNIST_CALIB = ROOT / "models" / "mnist_calib.npz"
MNIST_EVAL = ROOT / "models" / "mnist_eval.npz"


def digits(path) -> np.ndarray:
    return np.load(path)["input"]


def outputs(model, data: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"input": data})[0]


def test_the_headline_is_measured_on_the_held_out_calibration_samples(tmp_path):
    report_path, out = tmp_path / "r.json", tmp_path / "out.onnx"
    result = invoke(MNIST, out, "--filters", "0.5", "--calib", MNIST_CALIB, "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    x = digits(MNIST_CALIB)
    held = np.arange(len(x)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    original, pruned = onnx.load(str(MNIST)), onnx.load(str(out))
    assert report["data"] == {"source": "calibration", "samples": int(held.sum()), "held_out": True,
                              "in_sample": False}
    for part, figures in ((held, report["fidelity"]), (~held, report["fidelity"]["in_sample"])):
        expected = output_fidelity(outputs(original, x[part]), outputs(pruned, x[part]))
        assert figures["cosine"] == pytest.approx(expected["cosine"], abs=1e-6)
        assert figures["rel_l2"] == pytest.approx(expected["rel_l2"], abs=1e-6)
    assert report["fidelity"]["in_sample"]["samples"] == int((~held).sum())
    assert report["accuracy"]["samples"] == int(held.sum())
    assert f"measured on {held.sum()} held-out calibration samples, left out of every fit" in result.output
    assert "in_sample" not in result.output and "in-sample figures are in the report" in result.output


def test_evaluation_data_takes_precedence_over_the_held_out_samples(tmp_path):
    report = prune(str(MNIST), PruneConfig(filters=0.5, calibration=str(MNIST_CALIB),
                                           evaluation=str(MNIST_EVAL))).report
    assert report["data"] == {"source": "evaluation", "samples": 1000, "held_out": False, "in_sample": False}
    assert "in_sample" not in report["fidelity"]


def test_without_samples_to_spare_the_figures_are_in_sample_and_the_summary_says_so(tmp_path):
    data = tmp_path / "four.npz"
    np.savez(data, input=digits(MNIST_CALIB)[:HOLD_OUT_EVERY - 1])
    result = invoke(MNIST, tmp_path / "out.onnx", "--filters", "0.5", "--calib", data, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["data"]["in_sample"] is True
    assert "4 calibration samples the fits used: in-sample figures flatter the result" in result.output


# The held-out samples choose lstsq's ridge (and whether a layer's fit is used) and which model recovery
# keeps: all fixed here, so that only a fit could tell apart two calibration sets that differ in their
# held-out samples alone.
FIT_SETTINGS = {
    "activation scores": {"scorer": "activation", "recover": "none"},
    "pfp scores": {"scorer": "pfp", "recover": "none"},
    "bias shifts": {"scorer": "l1", "recover": "bias"},
    "lstsq weights": {"scorer": "l1", "recover": "lstsq"},
    "low-rank factors": {"filters": 0.0, "rank": 0.5, "recover": "none"},
}


@pytest.mark.parametrize("setting", FIT_SETTINGS)
def test_the_held_out_samples_are_absent_from_every_fit(monkeypatch, setting):
    monkeypatch.setattr(lstsq.LstsqFit, "_choose_ridge", lambda *_: (1e-2, None, None, ()))  # as with a fixed ridge
    monkeypatch.setattr(passes, "output_errors", lambda original, candidates, *_: [1.0, 0.5, 0.6][:len(candidates)])
    x = digits(MNIST_CALIB)
    other = x.copy()
    other[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY] *= -1  # negated digits

    def pruned(data, **evaluation):
        config = PruneConfig(**{"filters": 0.5, **FIT_SETTINGS[setting]}, calibration=CalibrationSet({"input": data}),
                             **evaluation)
        result = prune(str(MNIST), config)
        return result.model.SerializeToString(), result.report

    model, report = pruned(x)
    assert report["data"]["held_out"] and model == pruned(other)[0]
    # the control: with other evaluation data nothing is held out, and the fits see the change
    evaluation = {"evaluation": CalibrationSet({"input": digits(MNIST_EVAL)[:8]}, source="evaluation")}
    assert pruned(x, **evaluation)[0] != pruned(other, **evaluation)[0]


def test_a_sweep_of_data_aware_ranks_is_measured_on_held_out_samples(tmp_path):
    data = tmp_path / "calib20.npz"
    np.savez(data, input=digits(MNIST_CALIB)[:20])
    table = sweep(str(MNIST), PruneConfig(calibration=str(data), scorer="l1", recover="none"),
                  settings_grid([0.0], [0.5]), sensitivity=False)
    assert table["data"] == {"source": "calibration", "samples": 4, "held_out": True, "in_sample": False}


def test_the_channel_gate_on_a_model_without_a_channel_axis_is_refused_before_any_work(tmp_path):
    model = models.mixed_scale_head()
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"))
    graph.node.append(onnx.helper.make_node("Reshape", ["y", "flat_shape"], ["flat"], name="flatten_all"))
    graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, [22 * 8 * 8]))
    path = tmp_path / "flat.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out.onnx"
    result = invoke(path, out, "--filters", "0.5", "--max-channel-error", "0.3")
    assert result.exit_code == 2 and not out.exists(), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "--max-channel-error needs a floating-point output with a channel axis" in result.output
    assert "--output-axis NAME:AXIS" in result.output


def test_an_output_with_its_batch_on_axis_1_is_joined_on_that_axis(tmp_path):
    """CTC logits [steps, batch, classes]: the last, smaller batch differs on axis 1 (it was a ValueError, exit 4)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (5, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("ReduceMean", ["c2"], ["m"], axes=[2], keepdims=0, name="pool"),  # [N, 5, T]
             helper.make_node("Transpose", ["m"], ["y"], perm=[2, 0, 1], name="to_steps_first")]  # [T, N, 5]
    graph = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [6, "N", 5])], inits)
    path = tmp_path / "ctc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((10, 3, 4, 6)).astype(np.float32))
    from onnxprune.validate.compare import run_model

    outputs = run_model(session(str(path)), CalibrationSet({"x": np.load(calib)["x"]}), 4)
    assert outputs["y"].shape == (6, 10, 5)  # batches of 4, 4 and 2 lined up on axis 1
    result = invoke(path, tmp_path / "out.onnx", "--filters", "0.5", "--calib", calib, "--calib-batch", "4",
                    "--output-axis", "y:2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").exists()


def test_outputs_the_same_for_every_sample_are_flagged(tmp_path):
    from onnxprune.validate.compare import constant_over_samples

    varying = {"y": np.arange(6, dtype=np.float32).reshape(3, 2)}
    assert not constant_over_samples(varying)
    assert constant_over_samples({"y": np.ones((3, 2), np.float32), "ids": np.arange(3)})  # ids are not floats
    barely = np.ones((3, 2)) + np.array([[0.0], [2e-7], [-1e-7]])  # a random-init net's output
    assert constant_over_samples({"y": barely}) and not constant_over_samples({"y": barely + [[0], [1e-3], [0]]})
    model = onnx.load("models/mnist_resnet.onnx")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    weight.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(weight)), weight.name))
    onnx.save(model, tmp_path / "zero_head.onnx")
    result = invoke(tmp_path / "zero_head.onnx", tmp_path / "out.onnx", "--filters", "0.3", "--calib",
                    "models/mnist_calib.npz", "--calib-samples", "32", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["fidelity"]["reference_constant"] is True
    assert "the same for every sample" in result.output
    ordinary = prune("models/mnist_resnet.onnx", PruneConfig(filters=0.3, calibration="models/mnist_calib.npz",
                                                             calib_samples=32))
    assert ordinary.report["fidelity"]["reference_constant"] is False
