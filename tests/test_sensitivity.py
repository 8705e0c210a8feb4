"""The obs curves rescaled to output error: the OBS-updated weights written into the model for a
measurement (and restored after it), and the measured gain of a layer whose output is the model's output."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.calib.data import CalibrationSet, fixed_batch, input_specs
from onnxprune.loading import load
from onnxprune.scoring.base import ScoringContext
from onnxprune.scoring.consumers import find_consumers
from onnxprune.scoring.obs import _layer_matrix, gram_folds, greedy_removal, removal_batch
from onnxprune.scoring import sensitivity
from onnxprune.scoring.sensitivity import OutputProbe, measured_points, rescaled
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
    """(problems by group, the consumers' output names)."""
    analysis = analyze_model(load(model))
    context = ScoringContext(calibration=calibration, model=model, fixed_batch=_batch(model))
    by_group, layers = {}, []
    for fold in gram_folds(analysis, context, find_consumers(analysis)):
        layers.append(fold.consumer.node.outputs[0].name)
        for g, problem in fold.problems(analysis):
            by_group.setdefault(g, []).append(problem)
    return by_group, layers


def _probe(model, calibration, layers):
    return OutputProbe(model, calibration, _batch(model), layers, measurements=4)


@pytest.mark.parametrize("name", ["conv_chain", "grouped", "conv_transpose", "mlp", "mlp_gemm", "einsum_mlp",
                                  "lstm_bidirectional_stacked"])
def test_the_updated_weights_are_written_for_a_measurement(name):
    """Each consumer of the group, in the file a measurement ran, holds the OBS-updated weights and bias of
    its block, read back the way obs reads a layer; the unchanged weights measure no error, before and after."""
    model = models.all_builders()[name]()
    before = model.SerializeToString()
    calibration = _calibration(model)
    by_group, layers = _problems(model, calibration)
    group, problems = next(iter(sorted(by_group.items())))
    units = np.array(sorted(problems[0].columns)[:2])
    updated = [p.copy() for p in problems]
    for p in updated:
        p.remove(units)
    with _probe(model, calibration, layers) as probe:
        assert probe.errors(problems, [[p.weight for p in problems]])[0] == pytest.approx(0.0, abs=1e-10)
        assert probe.errors(problems, [[p.weight for p in updated]])[0] > 0
        replaced = onnx.ModelProto()  # the model as the measurement ran it
        replaced.CopyFrom(probe.probe)
        for tensor in replaced.graph.initializer:
            values = probe._initializers(problems, [p.weight for p in updated]).get(tensor.name)
            if values is not None:
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    assert model.SerializeToString() == before
    written = {c.name: c for c in find_consumers(analyze_model(load(replaced)))}
    for problem, change in zip(problems, updated):
        weight, bias = _layer_matrix(written[problem.consumer.name])
        per_block = len(change.weight)
        rows = slice(problem.block * per_block, (problem.block + 1) * per_block)
        np.testing.assert_allclose(weight[rows], change.weight[:, :-1], rtol=1e-5, atol=1e-6)
        if problem.consumer.layout.bias_input is None:  # a MatMul: the offset moves into the Add after it
            if _following_constant(model, problem.consumer) is None:
                continue  # no slot for it (einsum_mlp): the weights alone are replaced
            bias = _following_constant(replaced, problem.consumer) - _following_constant(model, problem.consumer)
        np.testing.assert_allclose(bias[rows], change.weight[:, -1], rtol=1e-5, atol=1e-6)


def _following_constant(model, consumer):
    output = consumer.node.outputs[0].name
    add = next((n for n in model.graph.node if n.op_type == "Add" and output in n.input), None)
    if add is None:
        return None
    constants = {t.name: t for t in model.graph.initializer}
    return next(numpy_helper.to_array(constants[i]) for i in add.input if i in constants).reshape(-1)


def test_a_layer_whose_output_is_the_models_output_has_a_gain_near_one():
    """mlp_gemm ends in a Gemm: the output error of cutting its input group is the curve's own error
    (measured on other rows of the held-out samples)."""
    model = models.all_builders()["mlp_gemm"]()
    calibration = _calibration(model, samples=200)
    by_group, layers = _problems(model, calibration)
    last = max(by_group)  # read by the final layer
    problems = by_group[last]
    channels = 1 + max(max(p.columns) for p in problems)
    points = measured_points(channels, removal_batch(channels), channels - 1)
    snapshots = dict.fromkeys(points)
    _, curve = greedy_removal(problems, channels, snapshots=snapshots)
    with _probe(model, calibration, layers) as probe:
        assert 8 <= probe.samples.count <= 32
        errors = probe.errors(problems, [snapshots[r] for r in points])
    # at half the channels, where the error is large enough that the two sets of held-out rows (the curve's
    # sampled rows, the probe's 32 samples) agree: 0.96 here
    assert errors[-1] / curve[points[-1]] == pytest.approx(1.0, rel=0.3)
    scaled = rescaled(curve, points, errors)
    np.testing.assert_allclose(scaled[points], errors)
    assert scaled[0] == 0


def test_measured_points_are_batch_ends_within_the_cut_allowed():
    assert measured_points(200, 7, 180) == [49, 98]
    assert measured_points(8, 1, 7) == [2, 4]
    assert measured_points(10, 1, 1) == [1]
    assert measured_points(2, 1, 0) == []


def test_measurements_out_of_graph_order_equal_fresh_ones():
    """The probe's stream advances to the first layer a measurement changes; a layer before its frontier
    starts it again: every measurement equals one made by a probe of its own."""
    model = models.residual_downsample()
    calibration = _calibration(model)
    by_group, layers = _problems(model, calibration)
    changed = {}
    for g, problems in by_group.items():
        updated = [p.copy() for p in problems]
        for p in updated:
            p.remove(np.array(sorted(p.columns)[:1]))
        changed[g] = (problems, [p.weight for p in updated])
    assert len(changed) >= 2
    with _probe(model, calibration, layers) as probe:
        order = sorted(changed, key=lambda g: -probe.first_node(changed[g][0]))  # last layer first
        errors = {g: probe.errors(changed[g][0], [changed[g][1]])[0] for g in order}
    for g in order:
        with _probe(model, calibration, layers) as fresh:
            assert errors[g] == pytest.approx(fresh.errors(changed[g][0], [changed[g][1]])[0], rel=1e-5)
            assert errors[g] > 0


def test_a_groups_measurements_share_one_session(monkeypatch):
    """All the measurements of one group run on one session of the graph from its first layer on (the
    weights fed to it), and give what they give one at a time."""
    from onnxprune.recover import stream as stream_module

    model = models.all_builders()["conv_chain"]()
    calibration = _calibration(model)
    by_group, layers = _problems(model, calibration)
    problems = by_group[min(by_group)]
    updated = [p.copy() for p in problems]
    for p in updated:
        p.remove(np.array(sorted(p.columns)[:2]))
    weights = [[p.weight for p in problems], [p.weight for p in updated]]
    with _probe(model, calibration, layers) as probe:
        alone = [probe.errors(problems, [w])[0] for w in weights]
        built, plain_session = [], stream_module.short_lived_session
        monkeypatch.setattr(stream_module, "short_lived_session",
                            lambda piece, *shared: built.append(piece) or plain_session(piece, *shared))
        together = probe.errors(problems, weights)
    assert len(built) == 1
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-12)
    assert together[0] == pytest.approx(0.0, abs=1e-10) and together[1] > 0


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_a_softmax_output_is_measured_by_its_log_odds_which_see_a_confident_sample_move():
    """The centred log-probabilities are the logits up to a per-sample constant: a confident sample whose
    logits move counts as much as an unsure one, where the squared error of probabilities shrinks it by p (1 - p)."""
    logits = np.array([[6.0, 0.0, -1.0], [0.2, 0.0, 0.1]])
    moved = logits + np.array([[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p, q = _softmax(logits), _softmax(moved)
    competing = sensitivity.competing_classes({"p": p})
    change = moved - logits - (moved - logits).mean(-1, keepdims=True)
    centred = logits - logits.mean(-1, keepdims=True)
    expected = np.sum(change ** 2) / np.sum(centred ** 2)
    assert sensitivity._output_error({"p": p}, {"p": q}, competing) == pytest.approx(expected, rel=1e-9)
    assert expected > 10 * sensitivity.output_error(p, q) ** 2  # (the case for it: the old measure hardly saw it)


def test_an_original_sure_of_nothing_is_measured_by_the_change_itself():
    """Equally likely classes have no log-odds to be relative to: the mean squared change, not a division by 0."""
    p = np.full((3, 4), 0.25)
    logits = np.log(p) + np.array([[0.5, 0.0, 0.0, -0.5]])
    q = _softmax(logits)
    change = logits - logits.mean(-1, keepdims=True)
    error = sensitivity.log_odds_error(p, q, sensitivity.competing_classes({"p": p})["p"])
    assert error == pytest.approx(np.mean(change ** 2), rel=1e-9)


def test_only_the_originals_most_probable_classes_count():
    """Of 100 classes, the five the original ranks highest per sample compete: the unlikely ones may change
    at will (a text recognizer's thousands of floored log-probabilities would otherwise decide)."""
    rng = np.random.default_rng(0)
    p = _softmax(rng.standard_normal((4, 3, 100)) * 3)
    competing = sensitivity.competing_classes({"p": p})["p"]
    assert competing.shape == (4, 3, sensitivity.COMPETING_CLASSES)
    top = np.sort(p, -1)[..., -sensitivity.COMPETING_CLASSES:]
    np.testing.assert_array_equal(np.sort(np.take_along_axis(p, competing, -1), -1), top)
    q = p.copy()
    others = np.ones_like(p, dtype=bool)
    np.put_along_axis(others, competing, False, -1)
    q[others] *= rng.uniform(0.01, 3.0, others.sum())  # every other class moves, the top five's ratios do not
    q /= q.sum(-1, keepdims=True)
    assert sensitivity.log_odds_error(p, q, competing) == pytest.approx(0.0, abs=1e-20)
    assert sensitivity.log_odds_error(p, q, np.broadcast_to(np.arange(100), p.shape)) > 0.01


def test_outputs_that_are_not_a_softmax_are_measured_by_their_relative_error():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 4))
    scores = 1 / (1 + np.exp(-logits))  # a sigmoid's: not summing to one
    single = np.ones((6, 1))  # a softmax over one class: nothing competes
    signed = np.array([[0.6, 0.6, -0.2]] * 6)  # sums to one, not a distribution
    near = _softmax(logits) * 1.01  # every sample sums to 1.01
    reference = {"logits": logits, "scores": scores, "single": single, "flat": _softmax(logits[:, 0]),
                 "signed": signed, "near": near}
    assert sensitivity.competing_classes(reference) == {}
    outputs = {name: value * 1.1 for name, value in reference.items()}
    errors = [sensitivity.output_error(value, outputs[name]) ** 2 for name, value in reference.items()]
    assert sensitivity._output_error(reference, outputs, {}) == pytest.approx(np.mean(errors))


def test_the_probe_measures_a_models_softmax_output_by_its_log_odds(monkeypatch):
    model = models.all_builders()["mlp"]()
    output = model.graph.output[0]
    model.graph.node.append(onnx.helper.make_node("Softmax", [output.name], ["probabilities"], axis=-1))
    model.graph.output.remove(output)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("probabilities"))
    calibration = _calibration(model)
    by_group, layers = _problems(model, calibration)
    problems = next(iter(sorted(by_group.items())))[1]
    updated = [p.copy() for p in problems]
    for p in updated:
        p.remove(np.array(sorted(p.columns)[:2]))
    measured = []
    monkeypatch.setattr(sensitivity, "log_odds_error", lambda *args: measured.append(args) or 0.5)
    with _probe(model, calibration, layers) as probe:
        assert list(probe.competing) == ["probabilities"]
        assert probe.errors(problems, [[p.weight for p in updated]]) == [0.5]
    (expected, _, classes), = measured
    np.testing.assert_array_equal(classes, probe.competing["probabilities"])
    np.testing.assert_array_equal(expected, probe.reference["probabilities"])


@pytest.mark.parametrize("batch, held_only", [(None, True), (1, True), (4, False)])
def test_the_probe_measures_on_held_out_samples_unless_a_fixed_batch_needs_whole_ones(batch, held_only):
    """The curves' Gram matrices leave the held-out samples out, and the probe measures on them: with a dynamic
    batch and with a fixed batch of 1 (any subset runs); a fixed batch above 1 draws whole batches from all."""
    from onnxprune.calib.data import held_out

    count = 40
    marks = np.arange(count, dtype=np.float32)[:, None]  # each sample carries its own index
    samples = sensitivity._samples(CalibrationSet({"x": marks}), batch, measurements=1)
    picked = samples.arrays["x"][:, 0].astype(int)
    assert len(picked) and (batch is None or len(picked) % batch == 0)
    assert held_out(picked).all() == held_only
