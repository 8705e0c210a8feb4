"""Re-choosing obs's channels on the pruned stream (scoring/reselect.py): the asymmetric target against a
direct least-squares solve, an unpruned stream giving obs's own choice, determinism."""

import numpy as np
import pytest

from onnxprune import PruneConfig, prune
from onnxprune.calib import CalibrationSet
from onnxprune.loading import load
from onnxprune.plan import source_names
from onnxprune.scoring.obs import damped, damped_inverse
from onnxprune.rewrite.streams import masked_model
from onnxprune.errors import UsageError
from onnxprune.scoring.reselect import asymmetric_target, reselect, reselect_sequential
from onnxprune.stages import analyze_model, choose
from tests import models
from tests.builders import Builder, x_input
from tests.test_latency_budget import CALIB, MNIST, fake_timer  # noqa: F401  (a fixture)


def test_asymmetric_target_is_the_ridge_least_squares_solution():
    """W~ = argmin ||W X_d - W' X_p||^2 / N + lambda ||W' - W||^2, solved directly on the stacked system."""
    rng = np.random.default_rng(0)
    rows, features, outputs = 300, 7, 4
    x_d = np.concatenate([rng.standard_normal((rows, features)), np.ones((rows, 1))], axis=1)
    x_p = x_d + 0.3 * np.concatenate([rng.standard_normal((rows, features)), np.zeros((rows, 1))], axis=1)
    weight = rng.standard_normal((outputs, features + 1))
    gram, cross = x_p.T @ x_p / rows, x_d.T @ x_p / rows
    lam = float(np.diag(damped(gram) - gram)[0])
    # rows of the stacked system: X_p / sqrt(N) -> X_d W^T / sqrt(N); sqrt(lambda) I -> sqrt(lambda) W^T
    a = np.concatenate([x_p / np.sqrt(rows), np.sqrt(lam) * np.eye(features + 1)])
    b = np.concatenate([x_d @ weight.T / np.sqrt(rows), np.sqrt(lam) * weight.T])
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(asymmetric_target(weight, cross, gram, damped_inverse(gram)), expected, atol=1e-9)
    assert not np.allclose(expected, weight)  # the drift moved it


def _setup(build, target_macs=0.6, seed=0):
    model = build()
    rng = np.random.default_rng(seed)
    feed = models.random_input(model, seed)
    calibration = CalibrationSet({k: rng.standard_normal((40, *v.shape[1:])).astype(v.dtype) for k, v in feed.items()})
    config = PruneConfig(scorer="obs", target_macs=target_macs, calibration=calibration, round_to=1, seed=seed,
                         recover="none")
    from onnxprune.baseline import prepare
    baseline = prepare(model, config)
    analysis = analyze_model(baseline.loaded)
    return baseline, analysis, config, choose(baseline, analysis, config, factorizing=False).keep


@pytest.mark.parametrize("build", [models.conv_chain, models.residual, models.concat])
def test_an_unpruned_stream_gives_obs_own_choice(build):
    baseline, analysis, config, keep = _setup(build)
    original = baseline.loaded.model
    again = reselect(analysis, keep, original, original, baseline.calibration, config.seed,
                     fixed_batch=baseline.fixed_batch)
    assert any(len(k) < analysis.groups[g].channels for g, k in keep.items())
    assert {g: k.tolist() for g, k in again.items()} == {g: k.tolist() for g, k in keep.items()}


def test_the_pruned_stream_re_chooses_with_the_same_counts_deterministically():
    baseline, analysis, config, keep = _setup(models.conv_chain, target_macs=0.4)
    masked = masked_model(analyze_model(baseline.loaded), keep, baseline.loaded.model.ir_version)
    runs = [reselect(analysis, keep, baseline.loaded.model, masked, baseline.calibration, config.seed,
                     fixed_batch=baseline.fixed_batch) for _ in range(2)]
    assert {g: k.tolist() for g, k in runs[0].items()} == {g: k.tolist() for g, k in runs[1].items()}
    assert {g: len(k) for g, k in runs[0].items()} == {g: len(k) for g, k in keep.items()}


@pytest.mark.parametrize("reselect_mode", [True, "sequential"])
def test_reselect_option_prunes_to_the_same_macs(reselect_mode):
    model = models.residual()
    rng = np.random.default_rng(1)
    feed = models.random_input(model, 1)
    data = {k: rng.standard_normal((40, *v.shape[1:])).astype(v.dtype) for k, v in feed.items()}
    results = [prune(model, PruneConfig(scorer="obs", target_macs=0.6, calibration=data, round_to=1, reselect=r))
               for r in (False, reselect_mode, reselect_mode)]
    assert results[1].plan.to_json() == results[2].plan.to_json()
    assert results[0].report["after"]["macs"] == results[1].report["after"]["macs"]


def deep_chain(seed: int = 0):
    """conv1(3->8) -> Relu -> conv2(8->8) -> Relu -> conv3(8->8) -> Relu -> conv4(8->4): three prunable groups,
    each read by the next conv, so each group's inputs are computed from the groups pruned before it."""
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.relu("relu2", b.conv("conv2", h, 8, 8))
    h = b.relu("relu3", b.conv("conv3", h, 8, 8))
    b.output(b.conv("conv4", h, 8, 4))
    return b.model(x_input(), name="deep_chain")


def _sequential(baseline, analysis, config, keep, stream_model):
    return reselect_sequential(analysis, keep, baseline.loaded.model, stream_model, baseline.calibration, config.seed,
                               fixed_batch=baseline.fixed_batch, run_batch=baseline.run_batch,
                               hold_out=baseline.held_out, shapes=baseline.loaded.shapes)


@pytest.mark.parametrize("build", [deep_chain, models.residual, models.concat])
def test_sequential_on_a_stream_equal_to_the_original_s_gives_obs_own_choice(build):
    """The engine walked over the original itself (nothing narrowed, nothing re-fitted): every group's
    statistics are obs's, at obs's sampled points, so every group keeps what obs chose."""
    import onnx

    baseline, analysis, config, keep = _setup(build, target_macs=0.5)
    stream = onnx.ModelProto()
    stream.CopyFrom(baseline.loaded.model)
    again = _sequential(baseline, analysis, config, keep, stream)
    assert sum(len(k) < analysis.groups[g].channels for g, k in keep.items()) >= (2 if build is deep_chain else 1)
    assert {g: k.tolist() for g, k in again.items()} == {g: k.tolist() for g, k in keep.items()}


def test_sequential_re_chooses_on_the_pruned_stream_deterministically(monkeypatch):
    """On the narrowed stream (re-fitted level by level) the counts stay obs's and two runs agree. Each group is
    chosen against the asymmetric target of its own stream: the first group reads the model's input, which no
    choice changes (the target is the original's weights, obs's choice), the later ones read narrowed, re-fitted
    layers (the target moves; whether a choice then moves depends on the data)."""
    import onnx

    from onnxprune.rewrite.streams import gathered_model
    from onnxprune.scoring import reselect as module

    baseline, analysis, config, keep = _setup(deep_chain, target_macs=0.4, seed=1)
    targets = []  # per run, the weights each group's greedy removal was given, in the order decided
    real = module.greedy_order_scores

    def recording(problems, channels):
        targets[-1].append(np.concatenate([p.weight for p in problems]))
        return real(problems, channels)

    monkeypatch.setattr(module, "greedy_order_scores", recording)
    streams = [gathered_model(analyze_model(baseline.loaded), keep, baseline.loaded.model.ir_version)
               for _ in range(2)] + [onnx.ModelProto()]
    streams[2].CopyFrom(baseline.loaded.model)  # the original itself: every target is the original's weights
    runs = []
    for stream in streams:
        targets.append([])
        runs.append(_sequential(baseline, analysis, config, keep, stream))
    assert {g: k.tolist() for g, k in runs[0].items()} == {g: k.tolist() for g, k in runs[1].items()}
    assert {g: len(k) for g, k in runs[0].items()} == {g: len(k) for g, k in keep.items()}
    first = next(g.index for g in analysis.prunable_groups() if source_names(g) == ("conv1",))
    assert runs[0][first].tolist() == keep[first].tolist()
    narrowed, original = targets[0], targets[2]
    assert len(narrowed) == len(original) == 3
    np.testing.assert_allclose(narrowed[0], original[0], rtol=1e-4, atol=1e-6)
    for moved, own in zip(narrowed[1:], original[1:]):
        assert np.linalg.norm(moved - own) > 0.05 * np.linalg.norm(own)


@pytest.mark.parametrize("value, scorer, message", [("mask", "obs", "give True"), (True, "l1", "needs the obs scorer")])
def test_reselect_option_is_checked_and_reported(value, scorer, message):
    model = models.residual()
    data = {k: np.repeat(v, 8, axis=0) for k, v in models.random_input(model, 1).items()}
    with pytest.raises(UsageError, match=message):
        prune(model, PruneConfig(scorer=scorer, target_macs=0.6, calibration=data, reselect=value))
    report = prune(model, PruneConfig(scorer="obs", target_macs=0.6, calibration=data, round_to=1, reselect=True,
                                      hidden=True)).report
    assert report["config"]["reselect"] is True and report["config"]["hidden"] is True


@pytest.mark.parametrize("build", [models.conv_chain, models.residual, models.grouped, models.mlp])
def test_gathered_model_computes_what_the_masked_model_does(build):
    """Consumers reading only the kept channels (a Gather) give the outputs of zeroed input weights, while
    every producer keeps its full width for the re-selection to read."""
    import onnx

    from onnxprune.runtime import session
    from onnxprune.rewrite.streams import gathered_model
    from onnxprune.validate import run_model

    baseline, analysis, config, keep = _setup(build, target_macs=0.5)
    fresh = [analyze_model(baseline.loaded) for _ in range(2)]
    ir = baseline.loaded.model.ir_version
    gathered, masked = gathered_model(fresh[0], keep, ir), masked_model(fresh[1], keep, ir)
    onnx.checker.check_model(gathered)
    assert any(n.op_type == "Gather" for n in gathered.graph.node) or build is models.grouped
    a, b, c = (run_model(session(m), baseline.calibration, 1) for m in (gathered, masked, baseline.loaded.model))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)
        assert not np.allclose(a[name], c[name])


def test_with_a_latency_target_the_channels_are_chosen_again_once_after_the_rounds(fake_timer, monkeypatch):
    """The latency rounds differ in counts alone: the channels are chosen again on the kept round only."""
    import onnxprune.stages as stages

    calls = []
    monkeypatch.setattr(stages, "reselect", lambda analysis, keep, *a, **k: calls.append(len(keep)) or dict(keep))
    report = prune(str(MNIST), PruneConfig(calibration=str(CALIB), scorer="obs", reselect="masked",
                                           target_speedup=1.5, recover="none")).report
    assert len(report["latency"]["rounds"]) > 1 and len(calls) == 1
