"""Masks held through fine-tuning and Dynamic Network Surgery's splicing thresholds (recover/masks.py), on
hand-built layers and a stand-in for onnxruntime-training's checkpoint parameters (the fine-tuning itself
is tested in tests/test_training.py, in the training environment)."""

import numpy as np
import pytest

from onnxprune.recover.masks import HeldWeights, splice, threshold_factor, thresholds


class Parameter:
    """Like onnxruntime.training's Parameter: `data` reads a copy, assigning writes it."""

    def __init__(self, values):
        self._values = np.array(values, dtype=np.float32)

    @property
    def data(self):
        return self._values.copy()

    @data.setter
    def data(self, values):
        self._values = np.array(values, dtype=np.float32)


def test_thresholds_are_the_papers_around_mean_plus_c_std():
    shadow = np.array([[-4.0, 1.0], [2.0, -3.0]])
    magnitude = np.abs(shadow)  # mean 2.5, std sqrt(1.25)
    centre = magnitude.mean() + 0.5 * magnitude.std()
    assert thresholds(shadow, 0.5) == pytest.approx((0.9 * centre, 1.1 * centre))


def test_splicing_restores_above_b_removes_below_a_and_keeps_the_band():
    # a hand-built layer: mean |W| + c std |W| = 1.0 exactly, so a = 0.9 and b = 1.1
    shadow = np.array([1.5, 0.5, 1.05, 0.95, 1.2, 0.2, 0.0, 0.0])
    factor = (1.0 - np.abs(shadow).mean()) / np.abs(shadow).std()
    keep = np.array([False, True, True, False, True, False, True, False])
    new = splice(shadow, keep, factor)
    # 1.5 pruned -> back (> b); 0.5 kept -> gone (< a); 1.05 kept, in the band -> stays kept; 0.95 pruned,
    # in the band -> stays pruned; 1.2 kept -> kept; 0.2 pruned -> pruned; zeros -> gone
    assert new.tolist() == [True, False, True, False, True, False, False, False]


def test_threshold_factor_puts_the_centre_at_the_layers_sparsity():
    shadow = np.random.default_rng(0).standard_normal(1000)
    factor = threshold_factor(shadow, 0.7)
    centre = np.abs(shadow).mean() + factor * np.abs(shadow).std()
    assert np.mean(np.abs(shadow) < centre) == pytest.approx(0.7, abs=0.002)


def test_held_zeros_stay_exactly_zero_after_each_step():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((8, 6)).astype(np.float32)
    values[rng.random(values.shape) < 0.6] = 0.0
    parameters = {"w": Parameter(values), "b": Parameter(np.zeros(3))}
    held = HeldWeights(parameters, ["w"])
    for _ in range(3):  # an optimizer step moves every element, zeros too
        parameters["w"].data = parameters["w"].data + rng.standard_normal(values.shape).astype(np.float32)
        parameters["b"].data = parameters["b"].data + 1.0
        held.after_step()
        after = parameters["w"].data
        assert np.array_equal(after == 0, values == 0)  # the zeros exactly, the others moved
    assert np.all(parameters["b"].data == 3.0)  # an unmasked parameter is left alone
    assert held.summary() == {"masked_tensors": 1, "weights": 48, "zeros": int((values == 0).sum()), "splicing": False}


def test_splicing_trains_the_pruned_weights_in_the_shadow_and_brings_them_back():
    kept = np.array([2.0, -2.0, 1.5, 0.05, 0.0, 0.0], dtype=np.float32)
    dense = np.array([2.0, -2.0, 1.5, 0.05, 0.3, -0.1], dtype=np.float32)  # before pruning
    parameters = {"w": Parameter(kept)}
    held = HeldWeights(parameters, ["w"], {"w": dense})
    assert np.array_equal(held.shadow["w"], dense)
    # an optimizer step whose change the pruned weights (applied as 0) see too: the 5th grows large
    step = np.array([0.0, 0.0, 0.0, 0.0, 2.0, 0.0], dtype=np.float32)
    parameters["w"].data = parameters["w"].data + step
    held.after_step()
    lower, upper = thresholds(held.shadow["w"], held.factor["w"])
    assert held.shadow["w"][4] == pytest.approx(2.3) and 2.3 > upper
    assert held.keep["w"].tolist() == [True, True, True, False, True, False]  # back; 0.05 < a went
    assert parameters["w"].data[4] == pytest.approx(2.3) and parameters["w"].data[3] == 0.0
