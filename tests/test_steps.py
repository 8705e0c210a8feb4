"""--steps N: the target reached in N prune-and-recover steps, each re-scored on the pruned model and
re-fitted to the original; one plan for the original; composed masks."""

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune import PruneConfig, prune
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.plan import GroupPlan, Plan
from onnxprune.stages import compose_masks

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
MNIST = str(ROOT / "models" / "mnist_resnet.onnx")
MNIST_CALIB = str(ROOT / "models" / "mnist_calib.npz")


def test_masks_compose_over_the_original_channels():
    first = {"a": np.array([1, 0, 1, 1, 0], bool)}
    second = {"a": np.array([0, 1, 1], bool), "b": np.array([1, 0], bool)}
    total = compose_masks(first, second)
    np.testing.assert_array_equal(total["a"], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(total["b"], [1, 0])
    np.testing.assert_array_equal(first["a"], [1, 0, 1, 1, 0])  # inputs untouched
    # channels split over two axes (a channel shuffle's [groups, per group]): kept positions compose in order
    grid = {"s": np.array([[1, 0, 1], [1, 0, 1]], bool)}
    np.testing.assert_array_equal(compose_masks(grid, {"s": np.array([[1, 0], [1, 0]], bool)})["s"],
                                  [[1, 0, 0], [1, 0, 0]])


def test_steps_on_a_channel_shuffle():
    from tests import models

    model = models.all_builders()["channel_shuffle"]()
    x = np.random.default_rng(0).standard_normal((12, *models.random_input(model)["x"].shape[1:])).astype(np.float32)
    result = prune(model, PruneConfig(scorer="l1", target_macs=0.6, calibration={"x": x}, steps=2))
    assert result.report["after"]["macs"] <= 0.6 * result.report["before"]["macs"] * 1.02


def test_plans_compose_to_positions_of_the_original():
    first = Plan([GroupPlan(["conv1"], 8, [0, 2, 3, 5, 7]), GroupPlan(["conv2"], 4, [0, 1, 2, 3])])
    second = Plan([GroupPlan(["conv1"], 5, [1, 4]), GroupPlan(["conv2"], 4, [3])])
    both = first.then(second)
    assert [g.keep for g in both.groups] == [[2, 7], [3]]
    assert [g.channels for g in both.groups] == [8, 4]


@pytest.mark.parametrize("scorer", ["l1", "obs"])
def test_steps_reach_the_macs_of_one_step_and_their_plan_rebuilds_the_channels(tmp_path, scorer):
    """The counts are allocated once for the whole target (default rounding to multiples of 8 included), so
    three steps end at the MACs of one; each step keeps fewer."""
    config = PruneConfig(scorer=scorer, target_macs=0.5, calibration=MNIST_CALIB, calib_samples=64, steps=3)
    stepped = prune(MNIST, config)
    one = prune(MNIST, PruneConfig(scorer=scorer, target_macs=0.5, calibration=MNIST_CALIB, calib_samples=64))
    before = stepped.report["before"]["macs"]
    assert stepped.report["after"]["macs"] == one.report["after"]["macs"] <= 0.5 * before
    assert [g.get("channels_after") for g in stepped.report["groups"]] == \
        [g.get("channels_after") for g in one.report["groups"]]
    steps = stepped.report["steps"]
    assert len(steps) == 3
    assert steps[-1]["macs_kept"] == pytest.approx(stepped.report["after"]["macs"] / before)
    assert all(later["macs_kept"] < earlier["macs_kept"] for earlier, later in zip(steps, steps[1:]))
    assert all(later["channels_kept"] < earlier["channels_kept"] for earlier, later in zip(steps, steps[1:]))
    # the composed plan, applied to the original in one go, removes the same channels
    replay = prune(MNIST, PruneConfig(plan=stepped.plan, calibration=MNIST_CALIB, calib_samples=64, recover="none"))
    assert replay.report["after"]["macs"] == stepped.report["after"]["macs"]


def test_steps_are_deterministic():
    config = PruneConfig(scorer="l1", target_macs=0.6, calibration=MNIST_CALIB, calib_samples=32, steps=2)
    a, b = prune(MNIST, config), prune(MNIST, config)
    assert a.plan.to_json() == b.plan.to_json()
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_steps_refuse_what_cannot_be_composed():
    for options in (dict(pfp_mode="sample"), dict(rank=0.5), dict(plan=Plan())):
        with pytest.raises(UsageError, match="--steps"):
            prune(MNIST, PruneConfig(steps=2, **options))


def test_cli_steps(tmp_path):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, [MNIST, str(tmp_path / "o.onnx"), "--calib", MNIST_CALIB, "--calib-samples", "32",
                                       "--target-macs", "0.6", "--scorer", "l1", "--steps", "2", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert len(__import__("json").loads(report.read_text())["steps"]) == 2
    bad = CliRunner().invoke(main, [MNIST, str(tmp_path / "o2.onnx"), "--steps", "0"])
    assert bad.exit_code == 2 and "--steps" in bad.output
