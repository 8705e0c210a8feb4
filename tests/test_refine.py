"""obs's allocation refined by measuring the whole cut (scoring/refine.py): the joint update against brute-force
least squares and the greedy's own weights, the local search at equal budget, and end to end."""

import numpy as np
import pytest

from onnxprune import PruneConfig, prune
from onnxprune.budget import Target
from onnxprune.scoring import obs
from onnxprune.scoring.obs import Problem, greedy_removal
from onnxprune.scoring.refine import joint_weights, local_search, stepped
from tests import models
from tests.test_obs import _brute_force, _calib, _problem


def test_one_group_cut_at_a_batch_end_gets_the_greedy_s_weights():
    problem, _ = _problem(seed=3, channels=8)
    snapshots = {3: None, 6: None}
    order, _ = greedy_removal([problem], 8, steps=3, snapshots=snapshots)
    for removed in (3, 6):
        found, weights = joint_weights({0: [problem]}, {0: order[:removed]})
        assert found == [problem]
        np.testing.assert_allclose(weights[0], snapshots[removed][0], atol=1e-8)


def test_two_groups_read_by_one_layer_are_refitted_together():
    """A layer reading two groups (a Concat) gets the least-squares weights with both cuts at once, not one
    group's update overwritten by the other's."""
    problem, damped = _problem(seed=5, channels=6)
    first = Problem(problem.weight, problem.hinv, {u: problem.columns[u] for u in range(3)}, problem.energy)
    second = Problem(problem.weight, problem.hinv, {u - 3: problem.columns[u] for u in range(3, 6)}, problem.energy)
    found, weights = joint_weights({0: [first], 1: [second]}, {0: np.array([1]), 1: np.array([0, 2])})
    assert len(found) == 1
    _, expected = _brute_force(problem.weight, damped, np.concatenate([problem.columns[u] for u in (1, 3, 5)]))
    np.testing.assert_allclose(weights[0], expected, atol=1e-8)


def test_a_step_is_an_eighth_of_the_channels_on_the_keep_choices():
    choices = np.arange(2, 17)
    assert stepped(choices, 10, 16, 1) == 12 and stepped(choices, 10, 16, -1) == 8
    assert stepped(choices, 16, 16, 1) is None and stepped(choices, 2, 16, -1) is None
    assert stepped(choices, 3, 16, -1) == 2  # as far as the floor
    assert stepped(np.array([8, 16, 24, 32]), 16, 32, 1) == 24


def _search_setting():
    """Three groups of 16 channels costing 1, 2 and 3 per channel, a budget of 48; the error is convex
    per group and group 0 (cheap) hurts most, so the allocation below (equal counts) is not the best."""
    channels = {0: 16, 1: 16, 2: 16}
    choices = {g: np.arange(2, 17) for g in channels}
    price = {0: 1.0, 1: 2.0, 2: 3.0}
    target = Target(48.0, lambda counts: sum(price[g] * counts[g] for g in counts), "macs")
    weight = {0: 10.0, 1: 1.0, 2: 1.0}
    calls = []

    def error(counts):
        calls.append(dict(counts))
        return sum(weight[g] * ((channels[g] - counts[g]) / channels[g]) ** 2 for g in counts)

    return channels, choices, target, error, calls


def test_the_search_lowers_the_measured_error_at_equal_budget_within_its_measurements():
    channels, choices, target, error, calls = _search_setting()
    start = {0: 8, 1: 8, 2: 8}
    counts, summary = local_search(start, [0, 1, 2], choices, channels, target, error, budget=20)
    assert target.measure(counts) <= target.limit
    assert summary["moves"] >= 1 and counts[0] > start[0]  # channels went to the group that hurts most
    assert summary["output_error"] == [pytest.approx(error(start)), pytest.approx(error(counts))]
    assert summary["output_error"][1] < summary["output_error"][0]
    assert summary["measurements"] == len(calls) - 2 <= 20  # (the two calls above)


def test_the_search_keeps_the_allocation_when_no_move_measures_better():
    channels, choices, target, _, calls = _search_setting()
    start = {0: 8, 1: 8, 2: 8}
    counts, summary = local_search(start, [0, 1, 2], choices, channels, target,
                                   lambda c: 0.0 if c == start else 1.0 + sum(c.values()) * 1e-3, budget=12)
    assert counts == start and summary["moves"] == 0 and summary["measurements"] <= 12


def test_obs_refined_meets_the_target_deterministically_and_lowers_its_measured_error(monkeypatch):
    model = models.concat()  # three groups, two of them read by one layer through a Concat
    config = PruneConfig(scorer="obs", target_macs=0.6, calibration=_calib(model, samples=40), round_to=1)
    plain = prune(model, config)
    assert "refinement" not in plain.report["scoring"]["budget"]
    monkeypatch.setattr(obs, "REFINE_MEASUREMENTS", 12)
    first, second = prune(model, config), prune(model, config)
    assert first.plan.to_json() == second.plan.to_json()
    assert first.report["after"]["macs"] <= 0.6 * first.report["before"]["macs"] * 1.02
    refined = first.report["scoring"]["budget"]["refinement"]
    assert 2 <= refined["measurements"] <= 12 and refined["samples"] > 0
    assert 0 < refined["output_error"][1] <= refined["output_error"][0]  # measured (a zero error would be no cut)
