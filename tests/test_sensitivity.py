"""The obs curves rescaled to output error: the OBS-updated weights written into a model copy, and the
measured gain of a layer whose output is the model's output."""

import numpy as np
import pytest
from onnx import numpy_helper

from onnxprune.calib.data import CalibrationSet, fixed_batch, input_specs
from onnxprune.loading import load
from onnxprune.scoring.base import ScoringContext
from onnxprune.scoring.consumers import find_consumers
from onnxprune.scoring.obs import _layer_matrix, gram_folds, greedy_removal
from onnxprune.scoring.sensitivity import _with_removal, output_curves
from onnxprune.stages import analyze_model
from tests import models


def _calibration(model, samples=40, seed=0):
    feed = models.random_input(model, seed)
    rng = np.random.default_rng(seed)
    return CalibrationSet({k: rng.standard_normal((samples, *v.shape[1:])).astype(v.dtype) for k, v in feed.items()})


def _batch(model):
    loaded = load(model)
    return fixed_batch(input_specs(loaded.model, loaded.input_shapes))


def _problems(model, calibration):
    analysis = analyze_model(load(model))
    context = ScoringContext(calibration=calibration, model=model, fixed_batch=_batch(model))
    by_group = {}
    for fold in gram_folds(analysis, context, find_consumers(analysis)):
        for g, problem in fold.problems(analysis):
            by_group.setdefault(g, []).append(problem)
    return by_group


@pytest.mark.parametrize("name", ["conv_chain", "grouped", "conv_transpose", "mlp", "mlp_gemm", "einsum_mlp"])
def test_the_updated_weights_are_written_into_the_copy(name):
    """Each consumer of the group in the copy holds the OBS-updated weights and bias of its block, read
    back the way obs reads a layer; the given model is unchanged."""
    model = models.all_builders()[name]()
    before = model.SerializeToString()
    by_group = _problems(model, _calibration(model))
    group, problems = next(iter(sorted(by_group.items())))
    units = np.array(sorted(problems[0].columns)[:2])
    trial = _with_removal(model, problems, units)
    assert model.SerializeToString() == before
    written = {c.name: c for c in find_consumers(analyze_model(load(trial)))}
    for problem in problems:
        updated = problem.copy()
        updated.remove(units)
        weight, bias = _layer_matrix(written[problem.consumer.name])
        per_block = len(updated.weight)
        rows = slice(problem.block * per_block, (problem.block + 1) * per_block)
        np.testing.assert_allclose(weight[rows], updated.weight[:, :-1], rtol=1e-5, atol=1e-6)
        if problem.consumer.layout.bias_input is None:  # a MatMul: the offset moves into the Add after it
            if _following_constant(model, problem.consumer) is None:
                continue  # no slot for it (einsum_mlp): the weights alone are written
            bias = _following_constant(trial, problem.consumer) - _following_constant(model, problem.consumer)
        np.testing.assert_allclose(bias[rows], updated.weight[:, -1], rtol=1e-5, atol=1e-6)


def _following_constant(model, consumer):
    output = consumer.node.outputs[0].name
    add = next((n for n in model.graph.node if n.op_type == "Add" and output in n.input), None)
    if add is None:
        return None
    constants = {t.name: t for t in model.graph.initializer}
    return next(numpy_helper.to_array(constants[i]) for i in add.input if i in constants).reshape(-1)


def test_a_layer_whose_output_is_the_models_output_has_a_gain_near_one():
    """mlp_gemm ends in a Gemm: the output error of cutting its input group is the curve's own error
    (measured on other samples), while the first group's error passes through a ReLU and a second layer."""
    model = models.all_builders()["mlp_gemm"]()
    calibration = _calibration(model, samples=200)
    by_group = _problems(model, calibration)
    orders, curves = {}, {}
    for g, problems in by_group.items():
        channels = 1 + max(max(p.columns) for p in problems)
        orders[g], curves[g] = greedy_removal(problems, channels)
    most = {g: len(c) - 1 for g, c in curves.items()}
    scaled, samples = output_curves(model, calibration, _batch(model), by_group, orders, curves, most)
    assert 8 <= samples <= 32
    last = max(by_group)  # read by the final layer
    half = len(curves[last]) // 2
    assert scaled[last][half] / curves[last][half] == pytest.approx(1.0, rel=0.3)
    assert set(scaled) == set(curves)
    assert all(np.all(scaled[g] >= 0) and scaled[g][0] == 0 for g in curves)
