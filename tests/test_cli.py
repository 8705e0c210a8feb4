"""The command line, through click's CliRunner, on the shipped MNIST ResNet."""

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_prune_writes_a_smaller_validated_model_and_report(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke(MODEL, out, "--filters", "0.5", "--calib", CALIB, "--report", report)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(report.read_text())
    for side in ("before", "after"):
        assert set(data[side]) >= {"params", "macs", "size_bytes"}
    assert data["after"]["macs"] < data["before"]["macs"] and data["after"]["params"] < data["before"]["params"]
    assert data["after"]["size_bytes"] == out.stat().st_size
    assert set(data["fidelity"]) >= {"cosine", "max_abs_diff", "top1_agreement", "rel_l2", "per_output"}
    assert 0 <= data["fidelity"]["top1_agreement"] <= 1
    # measured on the held-out fifth of the calibration samples, the in-sample figures beside them
    assert data["data"] == {"source": "calibration", "samples": 51, "held_out": True, "in_sample": False}
    assert data["fidelity"]["in_sample"]["samples"] == 205
    assert data["seed"] == 0 and data["version"]
    assert any(g["prunable"] and g["channels_after"] < g["channels"] for g in data["groups"])
    assert all("reasons" in g for g in data["groups"] if not g["prunable"])
    assert "MACs" in result.output and "fidelity" in result.output


def test_prune_subcommand_is_the_same_command(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert invoke(MODEL, a, "--filters", "0.3").exit_code == 0
    assert invoke("prune", MODEL, b, "--filters", "0.3").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_without_calibration_the_report_says_synthetic(tmp_path):
    report = tmp_path / "r.json"
    result = invoke(MODEL, tmp_path / "o.onnx", "--report", report)
    assert result.exit_code == 0
    assert json.loads(report.read_text())["data"]["source"] == "synthetic"
    assert "synthetic" in result.output


@pytest.mark.parametrize("scorer", ["l1", "l2", "bn", "random"])
def test_every_scorer_runs(tmp_path, scorer):
    report = tmp_path / "r.json"
    result = invoke(MODEL, tmp_path / "o.onnx", "--scorer", scorer, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["config"]["scorer"] == scorer


def test_scorers_choose_different_channels(tmp_path):
    plans = {}
    for scorer in ("l1", "random"):
        plan = tmp_path / f"{scorer}.json"
        assert invoke(MODEL, tmp_path / "o.onnx", "--scorer", scorer, "--plan-out", plan, "-q").exit_code == 0
        plans[scorer] = json.loads(plan.read_text())
    assert plans["l1"] != plans["random"]


def test_round_to_and_global(tmp_path):
    report = tmp_path / "r.json"
    assert invoke(MODEL, tmp_path / "o.onnx", "--filters", "0.3", "--round-to", "4", "--report", report).exit_code == 0
    groups = [g for g in json.loads(report.read_text())["groups"] if g["prunable"]]
    assert all(g["channels_after"] % 4 == 0 for g in groups)
    assert invoke(MODEL, tmp_path / "o.onnx", "--filters", "0.3", "--global", "--round-to", "1", "--report", report).exit_code == 0
    data = json.loads(report.read_text())
    prunable = [g for g in data["groups"] if g["prunable"]]
    removed = sum(g["channels"] - g["channels_after"] for g in prunable)
    assert removed == int(0.3 * sum(g["channels"] for g in prunable))
    assert len({g["channels_after"] / g["channels"] for g in prunable}) > 1  # not uniform


def test_exclude_leaves_matching_groups_whole(tmp_path):
    report = tmp_path / "r.json"
    assert invoke(MODEL, tmp_path / "o.onnx", "--exclude", "/layer1/*", "--report", report).exit_code == 0
    groups = json.loads(report.read_text())["groups"]
    hit = [g for g in groups if any(m.startswith("/layer1/") for m in g["members"])]
    assert hit and all(not g["prunable"] and "excluded" in g["reasons"][0] for g in hit)


@pytest.mark.parametrize("command", ["prune", "inspect", "sweep"])
def test_an_exclude_glob_matching_no_node_is_a_one_line_usage_error_naming_it(tmp_path, command):
    args = {"prune": [MODEL, tmp_path / "o.onnx"], "inspect": [MODEL], "sweep": [MODEL]}[command]
    result = invoke(command, *args, "--exclude", "/layer1/*", "--exclude", "/layr2/*")
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "'/layr2/*' matches no node" in result.output
    assert "node names" in result.output and "onnxprune inspect" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_an_exclude_glob_matching_no_node_is_refused_by_the_python_api_too():
    from onnxprune import PruneConfig, prune
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="'nothing\\*' matches no node"):
        prune(onnx.load(str(MODEL)), PruneConfig(filters=0.3, scorer="l1", exclude=("nothing*",)))


def test_nameless_nodes_are_named_after_their_first_output_so_groups_and_exclude_can_name_them():
    from onnxprune import inspect

    model = onnx.load(str(MODEL))
    for node in model.graph.node:
        node.name = ""
    groups = inspect(model)["groups"]
    sources = [s for g in groups for s in g["sources"]]
    assert "" not in sources and len(set(sources)) == len(sources)
    first = next(g for g in groups if g["prunable"])
    excluded = inspect(model, exclude=(first["sources"][0],))["groups"]
    assert not next(g for g in excluded if g["sources"] == first["sources"])["prunable"]
    assert all(node.name == "" for node in model.graph.node)  # the model given is not changed


def test_an_exclude_glob_may_name_a_node_the_loading_rewrite_made(tmp_path):
    from tests.ops.test_fused import fused_conv_activations

    model = tmp_path / "fused.onnx"
    onnx.save(fused_conv_activations(), str(model))  # conv2 is a FusedConv with Clip: loading writes 'conv2_clip'
    assert "conv2_clip" not in {n.name for n in onnx.load(str(model)).graph.node}
    data = json.loads(invoke("inspect", model, "--json", "--exclude", "conv2_clip").output)
    assert any("conv2_clip" in g["members"] and not g["prunable"] for g in data["groups"])
    assert invoke("inspect", model, "--no-simplify", "--exclude", "conv2_clip").exit_code == 2


def test_plan_round_trip_reproduces_the_output(tmp_path):
    plan = tmp_path / "plan.json"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert invoke(MODEL, a, "--scorer", "random", "--seed", "3", "--plan-out", plan).exit_code == 0
    assert invoke(MODEL, b, "--plan-in", plan).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_inspect_table_and_json():
    result = invoke("inspect", MODEL)
    assert result.exit_code == 0
    assert "prunable" in result.output and "coverage" in result.output
    assert "channels reach graph output 'logits'" in result.output
    data = json.loads(invoke("inspect", MODEL, "--json").output)
    assert data["params"] > 0 and data["macs"] > 0 and 0 < data["coverage"] <= 1
    assert sum(g["prunable"] for g in data["groups"]) == 6


def test_version_and_help():
    assert invoke("--version").output.strip().endswith("0.1.0")
    assert "--filters" in invoke("prune", "--help").output


def test_scorer_and_recovery_choices_come_from_the_registries(tmp_path):
    from onnxprune.recover import METHODS
    from onnxprune.scoring import SCORERS

    for command in (["prune", str(MODEL), str(tmp_path / "o.onnx")], ["sweep", str(MODEL)]):
        result = CliRunner().invoke(main, [*command, "--scorer", "nosuch"])
        assert result.exit_code == 2 and all(name in result.output for name in SCORERS)
    result = CliRunner().invoke(main, ["prune", str(MODEL), str(tmp_path / "o.onnx"), "--recover", "nosuch"])
    assert result.exit_code == 2 and all(name in result.output for name in METHODS)


def test_finetune_has_no_exclude_option(tmp_path):
    """Fine-tuning prunes no group: parameters left alone are chosen with --frozen."""
    result = CliRunner().invoke(main, ["finetune", str(MODEL), str(tmp_path / "o.onnx"), "--teacher", str(MODEL),
                                       "--calib", str(MODEL), "--exclude", "x"])
    assert result.exit_code == 2 and "--exclude" in result.output


@pytest.mark.parametrize("unit, achieved, target, said", [
    ("channels", 112, 112, "112 channels kept of a budget of 112"),
    ("macs", 5669264, 5695987, "5,669,264 MACs of a budget of 5,695,987"),
    ("ms", 1.5, 1.6, "1.500 ms predicted of a budget of 1.600"),
])
def test_the_scoring_line_says_what_was_spent_of_which_budget(unit, achieved, target, said):
    from onnxprune.report import format_scoring

    budget = {"unit": unit, "achieved": achieved, "target": target, "reached": True}
    (line,) = format_scoring({"scoring": {"scorer": "obs", "samples": 8, "data": "calibration", "budget": budget}})
    assert line == f"  scoring   obs on 8 calibration samples; {said}"
