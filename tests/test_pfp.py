"""Provable Filter Pruning: sensitivities, sample counts, the budget search and the re-weighting."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune import PruneConfig
from onnxprune.budget import CostModel, budget_target
from onnxprune.calib import input_specs, load_calibration
from onnxprune.cli import main
from onnxprune.loading import load
from onnxprune.stages import analyze_model
from onnxprune.scoring import ScoringContext, score
from onnxprune.scoring.consumers import find_consumers
from onnxprune.scoring.pfp import (PFPStats, alpha, draws_for_count, expected_unique, keep_for_eps,
                                   layer_sensitivity, relative_contributions, sample_channels, samples_needed)
from tests import models

MNIST = "models/mnist_resnet.onnx"
MNIST_CALIB = "models/mnist_calib.npz"


def _w(w):
    return np.asarray(w, dtype=np.float32)


def _pfp_scores(model, x, **options):
    """(analysis, pfp scores per group) of `model` on the inputs `x` (fed one sample at a time)."""
    loaded = load(model)
    analysis = analyze_model(loaded)
    calibration = load_calibration({"x": x}, input_specs(loaded.model, loaded.input_shapes))
    context = ScoringContext(calibration=calibration, model=loaded.model, fixed_batch=1, **options)
    return analysis, score(analysis, "pfp", context)


# ---------------------------------------------------------------- sensitivity, hand-computed


def test_relative_contribution_hand_computed():
    # W = [[2, 1, 1], [1, 2, 3]]; a1 = (1, 1, 1): z = (4, 6); a2 = (0, 2, 1): z = (3, 7)
    # g(f1) = (.5, .25, .25) and (0, 2/3, 1/3); g(f2) = (1/6, 2/6, 3/6) and (0, 4/7, 3/7)
    points = np.array([[1, 1, 1], [0, 2, 1]], dtype=np.float32)
    s, total = relative_contributions(points, _w([[2, 1, 1], [1, 2, 3]]))
    np.testing.assert_allclose(s, [0.5, 2 / 3, 0.5], rtol=1e-6)
    # per point, max over f: a1 -> (.5, 1/3, .5), a2 -> (0, 2/3, 3/7); summed over the points
    np.testing.assert_allclose(total, [0.5, 1 / 3 + 2 / 3, 0.5 + 3 / 7], rtol=1e-6)


def test_negative_weights_use_their_own_denominator():
    # W = [[1, -2, -2]], a = (1, 1, 3): z+ = 1, |z-| = 2 + 6 = 8 -> g = (1, 2/8, 6/8)
    s, _ = relative_contributions(np.array([[1, 1, 3]], np.float32), _w([[1, -2, -2]]))
    np.testing.assert_allclose(s, [1.0, 0.25, 0.75], rtol=1e-6)


def test_negative_activations_are_split_into_two_points():
    # W = [[2, 1, 1], [1, 2, 3]], a = (-1, 0, 2): points (0, 0, 2) and (1, 0, 0); each channel alone -> 1
    consumer = type("C", (), {})()
    consumer.weight = np.array([[2, 1, 1], [1, 2, 3]], np.float32)
    consumer.groups, consumer.channels = 1, 3
    s = layer_sensitivity(consumer, np.array([[-1, 0, 2]], np.float32))
    np.testing.assert_allclose(s, [1.0, 0.0, 1.0])


def test_denominator_below_float_eps_gives_zero():
    s, total = relative_contributions(np.array([[1e-9, 0, 0]], np.float32), _w([[1, 1, 1]]))
    np.testing.assert_array_equal(s, [0, 0, 0])
    np.testing.assert_array_equal(total, [0, 0, 0])


def test_conv_sensitivity_matches_brute_force_over_every_patch():
    """conv_chain's conv2 (k3, pad 1) over all positions of 3 inputs, against an explicit loop."""
    model = models.conv_chain(seed=3)
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    analysis, scores = _pfp_scores(model, x, pfp_points=10_000)
    consumer = find_consumers(analysis)[0]
    sess = ort.InferenceSession(_with_output(model, consumer.tensor).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    acts = np.concatenate([sess.run([consumer.tensor], {"x": x[i:i + 1]})[0] for i in range(3)])  # after Relu
    w = consumer.weight  # [4, 8, 3, 3]
    padded = np.pad(acts, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros(8)
    for n in range(3):
        for i in range(16):
            for j in range(16):
                patch = padded[n, :, i:i + 3, j:j + 3]  # [8, 3, 3]
                for f in range(4):
                    pos, neg = np.maximum(w[f], 0), np.maximum(-w[f], 0)
                    zp, zn = (pos * patch).sum(), (neg * patch).sum()
                    g = np.maximum(np.where(zp > 1.2e-7, pos * patch / max(zp, 1e-30), 0),
                                   np.where(zn > 1.2e-7, neg * patch / max(zn, 1e-30), 0))
                    expected = np.maximum(expected, g.reshape(8, -1).max(1))
    group = analysis.prunable_groups()[0]
    np.testing.assert_allclose(scores[group.index], expected, rtol=1e-4, atol=2e-6)  # atol: the 1e-6 tie-break


def _brute_force(weight, acts, stride, pad):
    """Max relative contribution per input channel, by explicit loops over samples, positions, filters."""
    k = weight.shape[2]
    padded = np.pad(acts, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = (padded.shape[2] - k) // stride + 1
    best = np.zeros(weight.shape[1])
    for n in range(len(acts)):
        for i in range(out):
            for j in range(out):
                patch = padded[n, :, i * stride:i * stride + k, j * stride:j * stride + k]
                for f in range(weight.shape[0]):
                    for part in (np.maximum(weight[f], 0), np.maximum(-weight[f], 0)):
                        z = (part * patch).sum()
                        if z > 1.2e-7:
                            best = np.maximum(best, (part * patch / z).reshape(len(best), -1).max(1))
    return best


def test_strided_and_pointwise_consumers_match_brute_force():
    """residual_downsample: conv0's channels feed a 3x3 stride-2 conv and a 1x1 stride-2 conv (max over
    both); the joined 16-channel group feeds a 3x3 conv. Every point of 2 inputs, against loops."""
    model = models.residual_downsample(seed=5)
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    analysis, scores = _pfp_scores(model, x, pfp_points=10_000)
    geometry = {"conv_a": (2, 1), "shortcut": (2, 0), "conv_out": (1, 1)}
    expected = {}
    for consumer in find_consumers(analysis):
        sess = ort.InferenceSession(_with_output(model, consumer.tensor).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        acts = np.concatenate([sess.run([consumer.tensor], {"x": x[i:i + 1]})[0] for i in range(len(x))])
        values = _brute_force(consumer.weight, acts, *geometry[consumer.name])
        for unit, value in zip(consumer.units, values):
            expected[unit] = max(expected.get(unit, 0.0), value)
    assert {c.name for c in find_consumers(analysis)} == set(geometry)
    for group in analysis.prunable_groups():
        np.testing.assert_allclose(scores[group.index], [expected[u] for u in group.unit_labels],
                                   rtol=1e-4, atol=2e-6)


def _deconv_model(group: int) -> onnx.ModelProto:
    """x [1,3,8,8] -> conv1 (3->12, k3) -> Sigmoid -> ConvTranspose (12->4, k3, stride 2, pads 1, output_padding
    1, group) -> Relu -> conv2 (4->2, 1x1). ConvTranspose windows overlap, so pre-activations mix inputs."""
    rng = np.random.default_rng(11)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in {
        "w1": rng.standard_normal((12, 3, 3, 3)) * 0.5, "b1": rng.standard_normal(12) * 0.1,
        "wt": rng.standard_normal((12, 4 // group, 3, 3)) * 0.5, "w2": rng.standard_normal((2, 4, 1, 1))}.items()]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Sigmoid", ["c1"], ["r1"], name="sigmoid1"),  # dense inputs: no ratio saturates at 1
             h.make_node("ConvTranspose", ["r1", "wt"], ["t"], name="deconv", strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1], group=group),
             h.make_node("Relu", ["t"], ["r2"], name="relu2"),
             h.make_node("Conv", ["r2", "w2"], ["y"], name="conv2")]
    graph = h.make_graph(nodes, "deconv", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 16, 16])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_consumer_matches_brute_force(group):
    model = _deconv_model(group)
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    analysis, scores = _pfp_scores(model, x, pfp_points=10_000)
    consumer = [c for c in find_consumers(analysis) if c.name == "deconv"][0]
    sess = ort.InferenceSession(_with_output(model, "r1").SerializeToString(), providers=["CPUExecutionProvider"])
    acts = np.concatenate([sess.run(["r1"], {"x": x[i:i + 1]})[0] for i in range(2)])  # [2, 12, 8, 8]
    wt = onnx.numpy_helper.to_array([i for i in model.graph.initializer if i.name == "wt"][0])
    per_in, per_out = 12 // group, 4 // group
    expected = np.zeros(12)
    for n in range(2):
        for part in (np.maximum(wt, 0), np.maximum(-wt, 0)):
            z = np.zeros((4, 16, 16))
            terms = []  # (input channel, output channel, output row, output col, contribution)
            for c in range(12):
                for f_local in range(per_out):
                    f = (c // per_in) * per_out + f_local
                    for i in range(8):
                        for j in range(8):
                            for ki in range(3):
                                for kj in range(3):
                                    oi, oj = 2 * i + ki - 1, 2 * j + kj - 1
                                    if 0 <= oi < 16 and 0 <= oj < 16:
                                        value = part[c, f_local, ki, kj] * acts[n, c, i, j]
                                        z[f, oi, oj] += value
                                        terms.append((c, f, oi, oj, value))
            for c, f, oi, oj, value in terms:
                if z[f, oi, oj] > 1.2e-7:
                    expected[c] = max(expected[c], value / z[f, oi, oj])
    group_index = analysis.group_of[consumer.units[0]]
    per_unit = np.zeros(analysis.groups[group_index].channels)
    np.maximum.at(per_unit, analysis.position[consumer.units], expected)  # group 2: channel blocks are joined
    assert len(np.unique(per_unit.round(6))) > 1  # not all saturated: the comparison can fail
    np.testing.assert_allclose(scores[group_index], per_unit, rtol=1e-4, atol=2e-6)


def _with_output(model, name):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return probe


def test_always_zero_channel_has_zero_sensitivity_and_goes_first():
    model = models.conv_chain(seed=1)
    for init in model.graph.initializer:  # conv1's channel 5 outputs 0 before the Relu, always
        if init.name.startswith("conv1."):
            values = onnx.numpy_helper.to_array(init).copy()
            values[5] = 0
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    analysis, scores = _pfp_scores(model, x)
    sens = scores[analysis.prunable_groups()[0].index]
    assert sens[5] == 0 and (np.delete(sens, 5) > 0).all()
    result = onnxprune.prune(model, PruneConfig(filters=1 / 8, calibration={"x": x}, scorer="pfp", round_to=1,
                                                recover="none"))
    assert 5 not in result.plan.groups[0].keep and len(result.plan.groups[0].keep) == 7


# ---------------------------------------------------------------- sample complexity, hand-computed


def test_alpha_formula():
    # 2 * 3 * ln(8 * (3 + 1) * 9 / 1e-16) = 6 * ln(2.88e18) = 6 * (1.05779 + 41.44653)
    assert alpha(3, 9) == pytest.approx(6 * 42.504319, rel=1e-6)


def test_samples_needed_formula():
    assert samples_needed(1.0, 10.0, 2.0) == 480  # 3 * (6 + 2) * 10 * 2 / 1
    assert samples_needed(10.0, 1.0, 1.0) == 1  # ceil(3 * 26 / 100) = ceil(0.78)
    assert samples_needed(0.5, 1.0, 0.0) == 0  # no sensitivity: nothing to sample


def test_expected_unique_and_keep_count():
    assert expected_unique([0.5, 0.5], 2) == pytest.approx(1.5)  # 2 * (1 - 0.25)
    assert expected_unique([0.5, 0.25, 0.25], 1) == pytest.approx(1.0)
    assert expected_unique([1.0, 0.0], 1e300) == pytest.approx(1.0)  # zero-probability channels never hit
    # eps = 1, alpha = 10, S = 2 -> m = 480 draws: every channel with p >= 0.05 is hit
    assert keep_for_eps(1.0, np.array([0.5, 0.3, 0.2]), 10.0, 2.0) == 3
    assert keep_for_eps(10.0, np.array([0.5, 0.25, 0.25]), 1.0, 1.0) == 1  # m = 1


def test_keep_count_decreases_as_eps_grows():
    p = np.random.default_rng(0).random(64)
    p /= p.sum()
    counts = [keep_for_eps(eps, p, alpha(100, 9), 3.0) for eps in np.logspace(-3, 4, 60)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 64 and counts[-1] == 1


def test_draws_for_count_reaches_the_count():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    m = draws_for_count(p, 3)
    assert math.ceil(expected_unique(p, m)) >= 3 > math.ceil(expected_unique(p, m - 1))


# ---------------------------------------------------------------- the budget search


def _mnist_with_sensitivities(seed=0):
    analysis = analyze_model(load(MNIST))
    rng = np.random.default_rng(seed)
    scores = {g.index: rng.random(g.channels) ** 3 for g in analysis.prunable_groups()}
    stats = PFPStats(alpha={g: alpha(100, 9) for g in scores})
    return analysis, scores, stats


@pytest.mark.parametrize("filters", [0.1, 0.3, 0.5, 0.7])
def test_budget_search_meets_channel_target_within_one_per_layer(filters):
    analysis, scores, stats = _mnist_with_sensitivities()
    counts, summary = stats.keep_counts(analysis, scores, budget_target(analysis, filters, None), round_to=1)
    total = sum(g.channels for g in analysis.prunable_groups())
    target = total - math.floor(filters * total)
    assert sum(counts.values()) <= target
    assert target - sum(counts.values()) <= len(counts)
    assert summary["achieved"] == sum(counts.values())


def test_nothing_to_remove_keeps_every_channel_even_without_sensitivity():
    analysis, scores, stats = _mnist_with_sensitivities()
    first = analysis.prunable_groups()[0].index
    scores[first][:3] = 0  # never active on the data: pruned first, but only when something must go
    counts, _ = stats.keep_counts(analysis, scores, budget_target(analysis, 0.0, None), round_to=1)
    assert counts == {g.index: g.channels for g in analysis.prunable_groups()}
    counts, _ = stats.keep_counts(analysis, scores, budget_target(analysis, 0.05, None), round_to=1)
    assert counts[first] <= analysis.groups[first].channels - 3


@pytest.mark.parametrize("target_macs", [0.8, 0.5, 0.3])
def test_budget_search_meets_mac_target_within_one_channel_per_layer(target_macs):
    analysis, scores, stats = _mnist_with_sensitivities(1)
    cost = CostModel.build(analysis)
    counts, summary = stats.keep_counts(analysis, scores, budget_target(analysis, None, target_macs, cost), round_to=1)
    limit = target_macs * cost.full
    achieved = cost.macs(counts)
    one_more = sum(cost.macs({**counts, g: min(counts[g] + 1, analysis.groups[g].channels)}) - achieved
                   for g in counts)
    assert achieved <= limit < achieved + one_more
    assert summary["achieved"] == pytest.approx(achieved)


def test_mac_estimate_matches_the_pruned_model():
    result = onnxprune.prune(MNIST, PruneConfig(target_macs=0.6, calibration=MNIST_CALIB, calib_samples=32,
                                                round_to=1, recover="none", scorer="pfp"))
    budget = result.report["scoring"]["budget"]
    assert result.report["scoring"]["scorer"] == "pfp"
    assert result.report["after"]["macs"] == pytest.approx(budget["achieved"], rel=0.02)
    assert result.report["after"]["macs"] <= 0.6 * result.report["before"]["macs"] * 1.02


# ---------------------------------------------------------------- sampling and re-weighting


def test_reweighting_preserves_the_expected_preactivation():
    """Mean over 3000 seeded draws of W[:, kept] (scale * a[kept]) is W a, within 4 standard errors."""
    rng = np.random.default_rng(42)
    weight = rng.standard_normal((5, 20))
    a = rng.random(20)
    sensitivity = rng.random(20) + 0.05
    estimates = []
    for seed in range(3000):
        kept, scale = sample_channels(sensitivity, 8, np.random.default_rng(seed))
        estimates.append(weight[:, kept] @ (scale * a[kept]))
    estimates = np.array(estimates)
    error = np.abs(estimates.mean(0) - weight @ a)
    standard_error = estimates.std(0) / np.sqrt(len(estimates))
    assert (error < 4 * standard_error).all()
    assert (standard_error < 0.1 * np.abs(weight @ a).max()).all()  # the test can fail: estimates are not wild


def test_sample_mode_rescales_the_consumer_weights():
    model = models.conv_chain(seed=2)
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    result = onnxprune.prune(model, PruneConfig(filters=0.5, calibration={"x": x}, scorer="pfp", pfp_mode="sample",
                                                round_to=1, recover="none", seed=7))
    group = result.plan.groups[0]
    assert group.scale is not None and len(group.scale) == len(group.keep)
    assert any(abs(s - 1) > 1e-6 for s in group.scale)
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}["conv2.weight"]
    pruned = [onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer
              if i.name.startswith("conv2.weight")][0]
    expected = original[:, group.keep] * np.array(group.scale, np.float32)[None, :, None, None]
    np.testing.assert_allclose(pruned, expected, rtol=1e-6)


def test_sample_mode_rescales_conv_transpose_input_channels():
    model = _deconv_model(1)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, PruneConfig(filters=0.5, calibration={"x": x}, scorer="pfp", pfp_mode="sample",
                                                round_to=1, recover="none", seed=1))
    group = [g for g in result.plan.groups if g.sources == ["conv1"]][0]
    assert group.scale is not None and any(abs(s - 1) > 1e-6 for s in group.scale)
    original = onnx.numpy_helper.to_array([i for i in model.graph.initializer if i.name == "wt"][0])
    pruned = [onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.startswith("wt")][0]
    kept_outputs = result.plan.groups[[g.sources for g in result.plan.groups].index(["deconv"])].keep
    expected = original[group.keep][:, kept_outputs] * np.array(group.scale, np.float32)[:, None, None, None]
    np.testing.assert_allclose(pruned, expected, rtol=1e-6)


def test_sample_mode_plan_round_trips_and_is_seeded(tmp_path):
    runner = CliRunner()
    model_path = tmp_path / "m.onnx"
    onnx.save(models.conv_chain(seed=2), model_path)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32))
    args = [str(model_path), "--calib", str(tmp_path / "c.npz"), "--pfp-mode", "sample", "--recover", "none",
            "--round-to", "1", "-q"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        result = runner.invoke(main, [args[0], str(tmp_path / f"{name}.onnx"), *args[1:], "--seed", seed,
                                      "--plan-out", str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
    plans = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc"}
    assert plans["a"] == plans["b"] and plans["a"] != plans["c"]
    assert any(g["scale"] for g in plans["a"]["groups"])  # --pfp-mode sample alone means pfp's sampling
    refused = runner.invoke(main, [args[0], str(tmp_path / "e.onnx"), *args[1:], "--scorer", "wanda"])
    assert refused.exit_code == 2 and "--pfp-mode sample" in refused.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    result = runner.invoke(main, [args[0], str(tmp_path / "d.onnx"), "--plan-in", str(tmp_path / "a.json"),
                                  "--calib", str(tmp_path / "c.npz"), "--recover", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_pfp_is_deterministic_for_a_seed():
    config = dict(filters=0.4, calibration=MNIST_CALIB, calib_samples=24, pfp_points=300, recover="none")
    a = onnxprune.prune(MNIST, PruneConfig(seed=3, **config)).plan.to_json()
    b = onnxprune.prune(MNIST, PruneConfig(seed=3, **config)).plan.to_json()
    assert a == b


@pytest.mark.parametrize("scorer", ["l1", "pfp"])
def test_an_unreachable_macs_target_is_noted_not_silently_missed(scorer):
    result = onnxprune.prune(MNIST, PruneConfig(target_macs=0.01, scorer=scorer, calibration=MNIST_CALIB, calib_samples=32,
                                           recover="none"))
    budget = result.report["scoring"]["budget"]
    assert budget["reached"] is False and budget["achieved"] > budget["target"]
    assert any(note.startswith("budget not reached") for note in result.report["scoring_notes"])
    reached = onnxprune.prune(MNIST, PruneConfig(target_macs=0.7, scorer=scorer, calibration=MNIST_CALIB, calib_samples=32,
                                            recover="none"))
    assert reached.report["scoring"]["budget"]["reached"] is True
    assert not any(note.startswith("budget not reached") for note in reached.report["scoring_notes"])


def test_the_cli_says_an_unreachable_macs_target_was_not_reached_and_exits_0(tmp_path):
    result = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), "--target-macs", "0.01", "--scorer", "l1",
                                       "--calib", MNIST_CALIB, "--calib-samples", "32", "--recover", "none"])
    assert result.exit_code == 0, result.output
    assert "not reached (see the note)" in result.output
    assert "note      budget not reached" in result.output
    assert (tmp_path / "out.onnx").exists()
