"""`onnxprune inspect --limits`: the largest share removable per group and per layer at an output error,
read off the curves the obs scorer and the sparsity stage compute (onnxprune/limits.py)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from test_training_graph import conv_bn_relu_gemm

from onnxprune.calib import CalibrationSet
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.limits import limits, merged_curve


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    model, calib = root / "model.onnx", root / "calib.npz"
    onnx.save(conv_bn_relu_gemm(seed=3), str(model))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    return model, calib


def test_limits_follow_the_curves_and_grow_with_the_error(files):
    model, calib = files
    tables = {e: limits(str(model), PruneConfig(calibration=str(calib)), e) for e in (0.05, 0.3)}
    for error, table in tables.items():
        assert table["groups"] and table["layers"]
        for group in table["groups"]:  # the limit is the last point of the curve at or below error^2
            curve = np.array(group["curve"])
            assert curve[group["removable"]] <= error ** 2
            assert group["removable"] == len(curve) - 1 or curve[group["removable"] + 1] > error ** 2
        for layer in table["layers"]:
            curve = np.array(table["layer_curves"][layer["name"]])
            assert 0 <= layer["fraction"] <= 1 and curve[0] == 0 and np.all(np.diff(curve) >= 0)
        measured = [p["rel_l2"] for p in table["model_weights"]]
        assert len(measured) == 6 and measured[-1] > measured[0]  # the model's weight curve, measured
    low, high = tables[0.05], tables[0.3]
    assert all(h["fraction"] >= l["fraction"] for l, h in zip(low["layers"], high["layers"]))
    assert sum(h["removable"] for h in high["groups"]) > sum(l["removable"] for l in low["groups"])


def test_the_model_curve_merges_the_cheapest_increments_first():
    groups = [{"channels": 4, "curve": [0.0, 0.01, 0.02, 0.5]}, {"channels": 6, "curve": [0.0, 0.04, 0.05, 0.06, 0.07, 0.9]}]
    points = merged_curve(groups)  # increments sorted: .01 (5 times) .04 .48 .83
    assert points[4]["fraction"] == 0.5 and points[4]["rel_l2"] == pytest.approx(np.sqrt(0.05))
    assert points[5]["fraction"] == 0.6 and points[5]["rel_l2"] == pytest.approx(np.sqrt(0.09))
    assert points[6]["fraction"] == 0.7 and points[6]["rel_l2"] == pytest.approx(np.sqrt(0.57))


def test_cli_limits_prints_the_table_and_writes_the_plot(files, tmp_path):
    pytest.importorskip("matplotlib")
    model, calib = files
    plot = tmp_path / "limits.png"
    run = CliRunner().invoke(main, ["inspect", str(model), "--limits", "--calib", str(calib), "--limit-error", "0.1",
                                    "--plot", str(plot)])
    assert run.exit_code == 0, run.output
    assert "largest share removable at output error 0.1" in run.output and "whole model, weights" in run.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = CliRunner().invoke(main, ["inspect", str(model), "--limits", "--calib", str(calib), "--json"])
    assert json.loads(run.output)["error"] == 0.05


@pytest.mark.parametrize("args, message", [
    (["--limits"], "--limits needs --calib data"),
    (["--plot", "x.png"], "--calib and --plot belong to --limits"),
    (["--limits", "--calib", "CALIB", "--limit-error", "2"], "--limit-error 2.0 is outside (0, 1)"),
])
def test_cli_limits_usage_errors_are_one_line(files, args, message):
    model, calib = files
    run = CliRunner().invoke(main, ["inspect", str(model), *[str(calib) if a == "CALIB" else a for a in args]])
    assert run.exit_code == 2, run.output
    assert message in run.output and len(run.output.strip().splitlines()) == 1


def test_limits_of_a_model_with_external_data_match_the_embedded_ones(files, tmp_path):
    """Its weights are memory maps (onnxprune.io): the layers' curves read them like embedded ones."""
    model, calib = files
    external = tmp_path / "external.onnx"
    onnx.save(onnx.load(str(model)), str(external), save_as_external_data=True, location="external.data",
              size_threshold=256)
    embedded, mapped = (limits(str(m), PruneConfig(calibration=str(calib))) for m in (model, external))
    assert mapped["layers"] and mapped["layers"] == embedded["layers"]


def test_limits_take_the_fused_convs_no_simplify_leaves_as_sparsity_does():
    from tests.ops.test_fused import fused_conv_residual

    x = np.random.default_rng(0).standard_normal([20, 3, 16, 16]).astype(np.float32)
    table = limits(fused_conv_residual(), PruneConfig(calibration={"x": x}, simplify=False))
    assert [r["name"] for r in table["layers"]] == ["conv1", "conv2", "conv3"]
    assert all(r["data_aware"] for r in table["layers"])
