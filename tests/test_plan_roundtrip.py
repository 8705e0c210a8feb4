"""Plans: --plan-out / --plan-in round-trip, and byte-identical outputs from the same input + plan or seed."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune.cli import main
from onnxprune.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory):
    """32 labelled calibration samples: enough to exercise data-driven stages, quick to run."""
    path = tmp_path_factory.mktemp("calib") / "calib32.npz"
    with np.load(CALIB) as data:
        np.savez(path, input=data["input"][:32], labels=data["labels"][:32])
    return path


def prune_twice(tmp_path, first_args, second_args):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    first = invoke(MODEL, a, *first_args)
    assert first.exit_code == 0, first.output
    second = invoke(MODEL, b, *second_args)
    assert second.exit_code == 0, second.output
    return a.read_bytes(), b.read_bytes()


def test_same_seed_gives_byte_identical_output_and_another_seed_does_not(tmp_path):
    args = ["--filters", "0.5", "--scorer", "random", "-q"]
    a, b = prune_twice(tmp_path, [*args, "--seed", "3"], [*args, "--seed", "3"])
    assert a == b
    a, c = prune_twice(tmp_path, [*args, "--seed", "3"], [*args, "--seed", "4"])
    assert a != c


@pytest.mark.parametrize("options", [
    ["--filters", "0.5", "--scorer", "random", "--seed", "7"],
    ["--filters", "0.3", "--global"],
    ["--filters", "0.25", "--rank", "0.5"],
    ["--filters", "0.25", "CALIB"],
], ids=["random", "global", "channels+ranks", "with-calibration"])
def test_plan_reapplies_to_a_byte_identical_output(tmp_path, small_calib, options):
    """The plan records every choice (kept channels, their re-weighting, ranks): applying it to the same
    input, without the options that made it, rebuilds the very same file."""
    data = ["--calib", str(small_calib)] if "CALIB" in options else []
    options = [o for o in options if o != "CALIB"] + data
    plan = tmp_path / "plan.json"
    a, b = prune_twice(tmp_path, [*options, "--plan-out", plan, "-q"], ["--plan-in", plan, *data, "-q"])
    assert a == b
    written = Plan.from_json(plan.read_text())
    assert any(len(g.keep) < g.channels for g in written.groups)
    if "--rank" in options:
        assert getattr(written, "lowrank", None), "ranks must be in the plan"
    # the plan file itself round-trips
    assert json.loads(Plan.from_json(plan.read_text()).to_json()) == json.loads(plan.read_text())


def test_an_edited_plan_changes_the_output(tmp_path):
    """The plan is what is applied: dropping another channel gives a different file (the test can fail)."""
    plan = tmp_path / "plan.json"
    a, _ = prune_twice(tmp_path, ["--filters", "0.5", "--plan-out", plan, "-q"], ["--filters", "0.5", "-q"])
    data = json.loads(plan.read_text())
    group = next(g for g in data["groups"] if 1 < len(g["keep"]))
    group["keep"] = group["keep"][:-1]
    if group.get("scale") is not None:
        group["scale"] = group["scale"][:-1]
    plan.write_text(json.dumps(data))
    result = invoke(MODEL, tmp_path / "c.onnx", "--plan-in", plan, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.onnx").read_bytes() != a


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["groups"][0].update(keep=[0, 999]), "invalid 'keep'"),
    (lambda d: d["groups"][0].update(keep=[]), "invalid 'keep'"),
    (lambda d: d["groups"][0].update(keep=[1, 1]), "invalid 'keep'"),
    (lambda d: d["groups"][0].update(sources=["/not/a/layer"]), "does not match this model"),
    (lambda d: d.update(version=99), "not supported"),
])
def test_a_bad_plan_is_a_usage_error(tmp_path, edit, message):
    plan = tmp_path / "plan.json"
    assert invoke(MODEL, tmp_path / "a.onnx", "--filters", "0.5", "--plan-out", plan, "-q").exit_code == 0
    data = json.loads(plan.read_text())
    edit(data)
    plan.write_text(json.dumps(data))
    out = tmp_path / "b.onnx"
    result = invoke(MODEL, out, "--plan-in", plan)
    assert result.exit_code == 2 and message in result.output and not out.exists()


def test_a_plan_that_is_not_json_is_a_usage_error(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("not json")
    result = invoke(MODEL, tmp_path / "b.onnx", "--plan-in", plan)
    assert result.exit_code == 2 and "cannot read plan" in result.output
