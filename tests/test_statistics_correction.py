"""Statistics correction after recovery: each re-fitted output channel gets the target's mean and spread
back; the recovered model with it is kept only when it is closer to the original on held-out samples."""

import numpy as np
import pytest
import onnx

from onnxprune import PruneConfig, prune
from onnxprune.recover import passes
from onnxprune.recover.lstsq import NormalEquations, spread_corrected

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_resnet.onnx"
MNIST_CALIB = ROOT / "models" / "mnist_calib.npz"


@pytest.mark.usefixtures("float64_products")
def test_a_known_shrink_and_shift_is_restored_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 2, 6)) + 1.5
    true_weight, true_bias = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 3))
    y = np.einsum("rgd,gdm->rgm", x, true_weight) + true_bias
    equations = NormalEquations(2, 6, 3)
    equations.add(x, y)
    shrunk = true_weight * np.array([0.5, 0.8, 0.3])  # a fit whose every output lost spread, and its mean
    weight, bias = spread_corrected(equations, shrunk, np.zeros((2, 3)))
    np.testing.assert_allclose(weight, true_weight, rtol=1e-8)
    np.testing.assert_allclose(bias, true_bias.reshape(-1), rtol=1e-8, atol=1e-10)


def _weights(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_the_corrected_model_is_kept_only_when_it_is_closer_on_held_out_samples(monkeypatch):
    config = PruneConfig(filters=0.5, scorer="l1", calibration=str(MNIST_CALIB), calib_samples=64)
    plain = prune(str(MNIST), config)
    section = plain.report["recovery"]["statistics_correction"]
    assert section["layers"] > 0
    held = plain.report["recovery"]["output_error_held_out"]["after"]
    assert section["kept"] == (section["output_error_held_out"] < held) or section["kept"]

    real = passes.output_errors
    monkeypatch.setattr(passes, "output_errors", lambda original, candidates, *a: [1.0, 0.5, 0.25][:len(candidates)])
    forced = prune(str(MNIST), config)
    assert forced.report["recovery"]["statistics_correction"]["kept"] is True
    assert forced.report["recovery"]["output_error_held_out"]["after"] == 0.25
    changed = [n for n, w in _weights(forced.model).items()
               if n in _weights(plain.model) and not np.allclose(w, _weights(plain.model)[n])]
    assert changed  # the corrected weights were written
    monkeypatch.setattr(passes, "output_errors", lambda original, candidates, *a: [1.0, 0.25, 0.5][:len(candidates)])
    kept_plain = prune(str(MNIST), config)
    assert kept_plain.report["recovery"]["statistics_correction"]["kept"] is False
    for name, w in _weights(kept_plain.model).items():
        np.testing.assert_array_equal(w, _weights(plain.model)[name])
    del real
