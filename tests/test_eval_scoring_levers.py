"""bench/eval_scoring.py's lever columns (`obs[damp=0.1,batches=64]`): parsed, applied to the modules
for a cell (default arguments too) and restored after it, so a column measures what it names."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

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


def test_the_probe_measure_columns_set_the_classes_or_measure_every_output_by_its_relative_error():
    """`classes=N` / `logodds` widen the log-odds to N / every class of a softmax output; `relative` measures it
    as any other output (the probe's measure before the log-odds); `kl` takes KL(original || pruned) in place of
    the log-odds."""
    bench = _bench()
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(12), size=6)
    q = rng.dirichlet(np.ones(12), size=6)
    five, every = sensitivity.competing_classes({"p": p})["p"], np.broadcast_to(np.arange(12), p.shape)
    measured = lambda: sensitivity._output_error({"p": p}, {"p": q}, sensitivity.competing_classes({"p": p}))
    assert measured() == sensitivity.log_odds_error(p, q, five)
    with bench.patched(bench.scorer_levers("obs[logodds]")[1]):
        assert measured() == sensitivity.log_odds_error(p, q, every)
    with bench.patched(bench.scorer_levers("obs[classes=12]")[1]):
        assert measured() == sensitivity.log_odds_error(p, q, every)
    with bench.patched(bench.scorer_levers("obs[classes=6]")[1]):
        six = np.argsort(p, -1)[:, -6:]
        assert measured() == pytest.approx(sensitivity.log_odds_error(p, q, six), rel=1e-12)
    with bench.patched(bench.scorer_levers("obs[relative]")[1]):
        assert measured() == sensitivity.output_error(p, q) ** 2
    with bench.patched(bench.scorer_levers("obs[kl]")[1]):
        assert measured() == pytest.approx(np.mean(np.sum(p * np.log(p / q), -1)), rel=1e-9)
        signed = {"y": p - 0.5}  # not a softmax: its relative error, as before
        assert sensitivity._output_error(signed, {"y": q - 0.5}, {}) == sensitivity.output_error(p - 0.5, q - 0.5) ** 2
    assert measured() == sensitivity.log_odds_error(p, q, five)  # restored


def test_refitgroups_makes_a_depthwise_conv_cut_in_its_channels_a_layer_to_re_fit_again():
    from onnxprune.recover import layers

    bench = _bench()
    eight, four = (("Conv", (channels, 1, 3, 3), {"group": channels}) for channels in (8, 4))
    assert layers.input_signature(*eight) == layers.input_signature(*four)
    with bench.patched(bench.scorer_levers("obs[refitgroups]")[1]):
        assert layers.input_signature(*eight) != layers.input_signature(*four)
    assert layers.input_signature(*eight) == layers.input_signature(*four)


def test_shares_switches_set_the_probes_cuts_in_both_modules_and_restore_them():
    bench = _bench()
    before = (sensitivity.SHARES, obs.SHARES)
    for switch, shares in (("shares1", (0.5,)), ("shares3", (0.25, 0.5, 0.75))):
        with bench.patched(bench.scorer_levers(f"obs[{switch}]")[1]):
            assert (sensitivity.SHARES, obs.SHARES) == (shares, shares)
        assert (sensitivity.SHARES, obs.SHARES) == before


def test_allsamples_makes_a_batch_one_models_probe_draw_from_every_calibration_sample_again():
    """obs[allsamples] restores the probe's old rule for a fixed batch of 1 (every calibration sample, the curves'
    own too) for its cells, and the held-out rule after them."""
    from onnxprune.calib.data import held_out

    bench = _bench()
    calibration = CalibrationSet({"x": np.arange(200, dtype=np.float32)[:, None]})
    picked = lambda: sensitivity._samples(calibration, 1, 1).arrays["x"][:, 0].astype(int)  # noqa: E731
    with bench.patched(bench.scorer_levers("obs[allsamples]")[1]):
        assert not held_out(picked()).all()
    assert held_out(picked()).all()


def test_batch1_copies_the_model_with_its_inputs_batch_fixed_at_one(tmp_path):
    import onnx
    from tests import models

    model = models.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # a dynamic batch
    source = tmp_path / "model.onnx"
    onnx.save(model, str(source))
    copy = onnx.load(_bench().batch_one(str(source), tmp_path / "batch1"))
    assert [value.type.tensor_type.shape.dim[0].dim_value for value in copy.graph.input] == [1] * len(copy.graph.input)
    assert onnx.load(str(source)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # the source untouched
