"""Quality gates through the CLI: pass -> exit 0 and output written; fail -> exit 1, no output (unless
--keep-failed), and the report, terminal and Markdown summary name the gate, its measured value and limit.

Limits are set just above or below values measured in a first run, so the tests follow whatever the
pipeline's defaults produce. Without --calib the pipeline uses synthetic inputs for scoring (no recovery
pass, which keeps these tests fast) and --eval gives the labelled data that gates are measured on.
"""

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import models
from onnxprune import PruneConfig, prune
from onnxprune.cli import main
from onnxprune.validate.gates import Gates

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
EVAL = ROOT / "models" / "mnist_calib.npz"
FILTERS = "0.25"
MARGIN = 0.01


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def measured():
    """The values the gates see for this model and setting (one run through the API)."""
    report = prune(str(MODEL), PruneConfig(filters=float(FILTERS), evaluation=str(EVAL))).report
    values = {
        "--min-cosine": min(f["cosine"] for f in report["fidelity"]["per_output"].values()),
        "--min-top1-agreement": report["fidelity"]["top1_agreement"],
        "--max-accuracy-drop": report["accuracy"]["drop"],
        "--max-macs": report["after"]["macs"] / report["before"]["macs"],
    }
    # every gate must be able to fail and to pass with a margin on either side
    assert values["--min-cosine"] < 1 - MARGIN and values["--min-top1-agreement"] < 1 - MARGIN
    assert values["--max-accuracy-drop"] > MARGIN and values["--max-macs"] > MARGIN
    return values


def limits(option, measured, passing):
    if option == "--min-speedup":  # measured latency varies; these limits cannot be crossed by noise
        return 0.01 if passing else 1000.0
    value = measured[option]
    lower = option.startswith("--min")
    return round(value - MARGIN if lower == passing else value + MARGIN, 6)


GATES = ["--min-cosine", "--min-top1-agreement", "--max-accuracy-drop", "--min-speedup", "--max-macs"]
GATE_NAMES = dict(zip(GATES, ["min_cosine", "min_top1_agreement", "max_accuracy_drop", "min_speedup", "max_macs"]))


def run_gate(tmp_path, option, limit, *extra):
    out, report, summary = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "summary.md"
    result = invoke(MODEL, out, "--filters", FILTERS, "--eval", EVAL, option, limit, "--report", report,
                    "--summary-md", summary, "--latency-runs", 3, "--latency-warmup", 1, *extra)
    return result, out, json.loads(report.read_text()) if report.exists() else None, summary


@pytest.mark.parametrize("option", GATES)
def test_gate_passes(tmp_path, measured, option):
    limit = limits(option, measured, passing=True)
    result, out, report, _ = run_gate(tmp_path, option, limit)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)))
    check, = report["gates"]["checks"]
    assert check["gate"] == GATE_NAMES[option] and check["passed"] and check["limit"] == pytest.approx(limit)
    assert report["gates"]["passed"] and report["output_written"] is True
    assert "gates     PASSED: 1 of 1" in result.output


@pytest.mark.parametrize("option", GATES)
def test_gate_fails_with_exit_1_and_writes_no_output(tmp_path, measured, option):
    limit = limits(option, measured, passing=False)
    result, out, report, summary = run_gate(tmp_path, option, limit)
    assert result.exit_code == 1, result.output
    assert not out.exists() and not list(tmp_path.glob("*.onnx"))
    check, = report["gates"]["checks"]
    assert not check["passed"] and not report["gates"]["passed"] and report["output_written"] is False
    assert check["option"] == option and check["limit"] == pytest.approx(limit)
    if option == "--min-speedup":
        assert check["value"] == report["latency"]["speedup"] < limit
    else:
        assert check["value"] == pytest.approx(measured[option], abs=1e-9)
    # the terminal and the error line name the gate, the measured value and the limit
    assert f"FAILED    {option} {limit:g}:" in result.output
    assert f"{check['value']:.4f}" in result.output and "error: validation failed" in result.output
    assert "not written" in result.output
    assert "NOT WRITTEN because a gate failed" in result.output  # the summary, printed after the outputs
    assert "**FAIL**" in summary.read_text() and option in summary.read_text()


def test_keep_failed_writes_the_output_but_still_exits_1(tmp_path, measured):
    result, out, report, _ = run_gate(tmp_path, "--max-macs", limits("--max-macs", measured, False), "--keep-failed")
    assert result.exit_code == 1
    assert out.exists() and report["output_written"] is True
    assert "written anyway" in result.output


def test_only_the_failing_gate_is_named(tmp_path, measured):
    out = tmp_path / "out.onnx"
    result = invoke(MODEL, out, "--filters", FILTERS, "--eval", EVAL, "--report", tmp_path / "r.json",
                    "--min-cosine", limits("--min-cosine", measured, True),
                    "--max-macs", limits("--max-macs", measured, False))
    assert result.exit_code == 1 and not out.exists()
    checks = json.loads((tmp_path / "r.json").read_text())["gates"]["checks"]
    assert [(c["gate"], c["passed"]) for c in checks] == [("min_cosine", True), ("max_macs", False)]
    assert "FAILED    --max-macs" in result.output and "FAILED    --min-cosine" not in result.output


def test_accuracy_gate_without_labels_is_a_usage_error_before_any_work(tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke(MODEL, out, "--max-accuracy-drop", "0.01")
    assert result.exit_code == 2 and "needs labels" in result.output
    assert not out.exists()


def test_top1_gate_on_a_model_without_classifier_output_is_a_usage_error(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(models.conv_chain(), str(path))
    result = invoke(path, tmp_path / "out.onnx", "--min-top1-agreement", "0.5")
    assert result.exit_code == 2 and "[batch, classes]" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_api_reports_failed_gates_without_raising(measured):
    gates = Gates(max_macs=limits("--max-macs", measured, False))
    result = prune(str(MODEL), PruneConfig(filters=float(FILTERS), evaluation=str(EVAL), gates=gates))
    assert result.model is not None and not result.report["gates"]["passed"]
    assert result.report["gates"]["checks"][0]["value"] == pytest.approx(measured["--max-macs"])
