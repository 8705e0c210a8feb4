"""bench/eval_scoring.py's lever columns (`obs[damp=0.1,batches=64]`): parsed, applied to the modules
for a cell (default arguments too) and restored after it, so a column measures what it names."""

import importlib.util
from pathlib import Path

import numpy as np

from onnxprune.calib.data import CalibrationSet
from onnxprune.scoring import obs, sensitivity


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "eval_scoring.py"
    spec = importlib.util.spec_from_file_location("eval_scoring_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lever_columns_parse_into_patches_data_and_config_fields():
    bench = _bench()
    name, patches, calib, fields = bench.scorer_levers("obs[damp=0.1,calib=512,steps=2,nostats]")
    assert (name, calib, fields) == ("obs", 512, {"steps": 2})
    assert ("onnxprune.scoring.obs", "DAMP", 0.1) in patches
    assert any(attribute == "spread_corrected" for _, attribute, _ in patches)
    assert bench.scorer_setting("obs[steps=2]") == {"scorer": "obs", "steps": 2}
    assert bench.scorer_levers("obs") == ("obs", [], None, {})


def test_patches_reach_default_arguments_and_are_restored():
    bench = _bench()
    before = (obs.DAMP, obs.REMOVAL_STEPS, obs.removal_batch(129), obs.greedy_removal.__defaults__)
    with bench.patched(bench.scorer_levers("obs[damp=0.5,batches=64]")[1]):
        assert obs.DAMP == 0.5
        assert obs.removal_batch(129) == 2  # 128 units in 64 batches
        assert obs.greedy_removal.__defaults__[0] == 64
    assert (obs.DAMP, obs.REMOVAL_STEPS, obs.removal_batch(129), obs.greedy_removal.__defaults__) == before


def test_the_probe_s_samples_cover_the_whole_held_out_part_and_the_first_column_takes_the_first():
    bench = _bench()
    calibration = CalibrationSet({"x": np.arange(256, dtype=np.float32)[:, None]})
    spread = sensitivity._samples(calibration, None, 50).arrays["x"][:, 0]
    with bench.patched(bench.scorer_levers("obs[first]")[1]):
        first = sensitivity._samples(calibration, None, 50).arrays["x"][:, 0]
    assert len(spread) == len(first) == 32
    assert first.max() < 160 and spread.min() == 4 and spread.max() == 254  # every fifth sample is held out
    assert np.all(spread % 5 == 4) and len(set(spread)) == 32


def test_the_refine_column_sets_the_refinement_s_measurements():
    bench = _bench()
    assert bench.scorer_levers("obs[refine]")[1] == [("onnxprune.scoring.obs", "REFINE_MEASUREMENTS", 48)]
    assert bench.scorer_levers("obs[refine=20,step=0.25]")[1] == [
        ("onnxprune.scoring.obs", "REFINE_MEASUREMENTS", 20), ("onnxprune.scoring.refine", "STEP", 0.25)]
    with bench.patched(bench.scorer_levers("obs[refine]")[1]):
        assert obs.REFINE_MEASUREMENTS == 48
    assert obs.REFINE_MEASUREMENTS == 0


def test_the_logodds_column_measures_softmax_outputs_by_their_logits_and_others_as_before():
    """For a softmax output the error is that of the logits up to a per-sample constant: a confident sample
    whose logits move counts as much as an unsure one (the squared error of probabilities shrinks it)."""
    bench = _bench()
    logits = np.array([[6.0, 0.0, -1.0], [0.2, 0.0, 0.1]])
    moved = logits + np.array([[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # the confident sample's logits move

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    centred = logits - logits.mean(-1, keepdims=True)
    expected = np.sum((moved - logits - (moved - logits).mean(-1, keepdims=True)) ** 2) / np.sum(centred ** 2)
    error = bench._log_probability_error({"p": softmax(logits)}, {"p": softmax(moved)})
    assert np.isclose(error, expected, rtol=1e-9)
    assert error > sensitivity._output_error({"p": softmax(logits)}, {"p": softmax(moved)})
    features = {"y": logits}  # not a distribution: the squared relative error, as the default measures it
    assert bench._log_probability_error(features, {"y": moved}) == sensitivity._output_error(features, {"y": moved})
