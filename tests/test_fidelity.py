"""Fidelity that shows the damage: per-channel errors of every output, the worst channel on the
terminal and as a gate, the channel axis override, held-out figures and the no-data message."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from onnxprune import PruneConfig, prune
from onnxprune.cli import main
from onnxprune.validate.compare import channel_errors

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
    np.testing.assert_allclose(channel_errors(reference, result, 1), [0.0, 1.0])
    # along the last axis each slice mixes both channels: norms of the differences 1 and 1, of the
    # references sqrt(3^2 + 1^2) and sqrt(4^2 + 1^2)
    np.testing.assert_allclose(channel_errors(reference, result, 2), [np.sqrt(1 / 10), np.sqrt(1 / 17)])
    # a channel whose reference is all zeros: its absolute error
    np.testing.assert_allclose(channel_errors(np.zeros((1, 2)), np.array([[0.0, 0.5]]), 1), [0.0, 0.5])


def test_the_whole_output_hides_a_destroyed_block_the_channels_show_it(tmp_path, head_path):
    report_path = tmp_path / "r.json"
    result = invoke(head_path, tmp_path / "out.onnx", "--filters", "0.5", "--report", report_path)
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
                                           ("y:last", "is not NAME:AXIS")])
def test_a_bad_output_axis_is_refused_before_any_work(tmp_path, nhwc_path, axis, message):
    out = tmp_path / "out.onnx"
    result = invoke(nhwc_path, out, "--output-axis", axis)
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
