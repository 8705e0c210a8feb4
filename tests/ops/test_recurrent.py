"""Recurrent layers (LSTM, GRU, RNN): hidden units are pruned (their gate rows of W, R and B, their
column of R, their channel of Y in both directions) and input features are sliced from W; the cost model
counts the input and recurrent matrix products of every step.

The oracle also zeroes a dropped unit's column of R (tests/oracle.py): only then does the unit contribute
nothing, since its state feeds every gate of the next step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnxprune.ops.recurrent import GATES
from onnxprune.plan import Plan
from onnxprune.validate.cost import node_macs
from tests.builders import Builder
from tests.oracle import family_tests

STEPS, FEATURES, HIDDEN = 6, 8, 12


def _recurrent(b: Builder, op: str, name: str, x: str, features: int, directions: int, states: bool = False):
    """An op layer over x [steps, 1, features] -> Y [steps, directions, 1, HIDDEN]."""
    gates = GATES[op]
    inputs = [x, b.randn(f"{name}.W", [directions, gates * HIDDEN, features], 1 / math.sqrt(features)),
              b.randn(f"{name}.R", [directions, gates * HIDDEN, HIDDEN], 1 / math.sqrt(HIDDEN)),
              b.randn(f"{name}.B", [directions, 2 * gates * HIDDEN], 0.1)]
    if states:  # constant initial states and LSTM's peepholes
        inputs += ["", b.randn(f"{name}.initial_h", [directions, 1, HIDDEN], 0.5),
                   b.randn(f"{name}.initial_c", [directions, 1, HIDDEN], 0.5),
                   b.randn(f"{name}.P", [directions, 3 * HIDDEN], 0.3)]
    direction = "bidirectional" if directions == 2 else "forward"
    return b.node(op, name, inputs, n_out=1, hidden_size=HIDDEN, direction=direction)


def _features(b: Builder, name: str, y: str, directions: int) -> str:
    """Y [steps, directions, 1, hidden] -> [steps, 1, directions * hidden] (Transpose, Reshape)."""
    y = b.node("Transpose", f"{name}_t", [y], perm=[0, 2, 1, 3])
    return b.node("Reshape", f"{name}_merge", [y, b.const(f"{name}_merge.shape", [0, 0, -1], np.int64)])


def recurrent(seed: int = 0, op: str = "LSTM", directions: int = 2, layers: int = 1, states: bool = False):
    """x [1, 6, 8] -> proj(8->16) -> Relu -> Transpose to [6, 1, 16] -> `layers` op layers (hidden 12,
    `directions`; their Y merged to [6, 1, directions * 12]) -> Transpose to [1, 6, ...] -> out(->5).

    Prunable: proj's 16 channels (W's columns), each layer's 12 hidden units (both directions).
    """
    b = Builder(seed)
    h = b.relu("relu1", b.matmul("proj", "x", FEATURES, 16))
    h, features = b.node("Transpose", "time_major", [h], perm=[1, 0, 2]), 16
    for i in range(layers):
        h = _features(b, f"rnn{i}", _recurrent(b, op, f"rnn{i}", h, features, directions, states), directions)
        features = directions * HIDDEN
    h = b.node("Transpose", "batch_major", [h], perm=[1, 0, 2])
    b.output(b.matmul("out", h, features, 5))
    return b.model([("x", [1, STEPS, FEATURES])], name=f"recurrent_{op.lower()}")


BUILDERS = {
    "lstm_bidirectional_stacked": lambda seed=0: recurrent(seed, layers=2),
    "lstm_states_peepholes": lambda seed=0: recurrent(seed, directions=1, states=True),
    "gru": lambda seed=0: recurrent(seed, op="GRU"),
    "rnn": lambda seed=0: recurrent(seed, op="RNN", directions=1),
}
BLOCKED: dict[str, str] = {}

test_pruning_dead_channels_is_exact, _ = family_tests(BUILDERS, BLOCKED)


def test_every_hidden_unit_and_input_feature_is_prunable():
    from onnxprune import inspect

    groups = inspect(BUILDERS["lstm_bidirectional_stacked"]())["groups"]
    assert [(g["sources"], g["channels"], g["prunable"]) for g in groups] == [
        (["proj"], 16, True), (["rnn0"], HIDDEN, True), (["rnn1"], HIDDEN, True), (["out"], 5, False)]


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_a_recurrent_layer_costs_its_input_and_recurrent_products_per_step(op, gates):
    steps, batch, features, hidden = 5, 2, 4, 8
    shapes = {"x": (steps, batch, features), "w": (1, gates * hidden, features), "r": (1, gates * hidden, hidden),
              "y": (steps, 1, batch, hidden)}
    node = helper.make_node(op, ["x", "w", "r"], ["y"], hidden_size=hidden)
    per_step = gates * hidden * features + gates * hidden * hidden
    assert node_macs(node, shapes, {}) == steps * batch * per_step


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_mac_estimate_of_a_plan_is_the_pruned_models(name):
    """The recurrent product shrinks with the kept units twice (the input product with features x units)."""
    from onnxprune import PruneConfig, prune
    from onnxprune.budget import CostModel
    from onnxprune.loading import load
    from onnxprune.stages import analyze_model
    from tests.oracle import drop_every_other

    model = BUILDERS[name]()
    analysis = analyze_model(load(model))
    keep = drop_every_other(analysis)
    counts = {g: len(k) for g, k in keep.items()}
    result = prune(model, PruneConfig(plan=Plan.from_keep(analysis, keep)))
    assert CostModel.build(analysis).macs(counts) == pytest.approx(result.report["after"]["macs"])


def _single_layer(layout: int = 0):
    """x -> proj(8->16) -> Relu -> one LSTM (forward, hidden 12) -> its Y_h; `layout` 1: batch-first
    (x [1, 6, 16], no transpose)."""
    b = Builder(0)
    h = b.relu("relu1", b.matmul("proj", "x", FEATURES, 16))
    if layout == 0:
        h = b.node("Transpose", "time_major", [h], perm=[1, 0, 2])
    inputs = [h, b.randn("rnn.W", [1, 4 * HIDDEN, 16], 0.25), b.randn("rnn.R", [1, 4 * HIDDEN, HIDDEN], 0.3)]
    outputs = b.node("LSTM", "rnn", inputs, n_out=2, hidden_size=HIDDEN, layout=layout)
    b.output(outputs[1])
    state_shape = [1, 1, HIDDEN]
    return b.model([("x", [1, STEPS, FEATURES])], outputs=[("y", state_shape)], name="single_lstm")


def _reasons(groups, source):
    return [(g["prunable"], " ".join(g.get("reasons", []))) for g in groups if g["sources"] == [source]]


def streaming(seed: int = 0):
    """The voice-activity model's pattern: x -> proj(8->16) -> Relu -> LSTM (forward, hidden 12) whose
    initial states are model inputs h0, c0 and whose final states are graph outputs h, c; Y -> out(->3)."""
    b = Builder(seed)
    h = b.relu("relu1", b.matmul("proj", "x", FEATURES, 16))
    h = b.node("Transpose", "time_major", [h], perm=[1, 0, 2])
    inputs = [h, b.randn("rnn.W", [1, 4 * HIDDEN, 16], 0.25), b.randn("rnn.R", [1, 4 * HIDDEN, HIDDEN], 0.3),
              b.randn("rnn.B", [1, 8 * HIDDEN], 0.1), "", "h0", "c0"]
    y, y_h, y_c = b.node("LSTM", "rnn", inputs, n_out=3, hidden_size=HIDDEN)
    y = b.node("Squeeze", "squeeze", [y, b.const("squeeze.axes", [1], np.int64)])
    b.output(b.matmul("out", y, HIDDEN, 3))
    b.output(y_h, "h")
    b.output(y_c, "c")
    state = [1, 1, HIDDEN]
    return b.model([("x", [1, STEPS, FEATURES]), ("h0", state), ("c0", state)],
                   outputs=[("y", [STEPS, 1, 3]), ("h", state), ("c", state)], name="streaming_lstm")


def test_a_streaming_state_keeps_its_width_and_the_kept_units_are_exact():
    """Initial states from model inputs are gathered to the kept units; the final states (graph outputs)
    come back full width: the kept units' values exact, zeros at the removed ones."""
    from onnxprune import PruneConfig, inspect, prune
    from tests.builders import random_input, run
    from tests.oracle import zero_dropped

    assert all(g["prunable"] for g in inspect(streaming())["groups"] if g["sources"] in (["proj"], ["rnn"]))
    zeroed, plan = zero_dropped(streaming())
    [units] = [g for g in plan.groups if g.sources == ["rnn"]]
    kept = np.zeros(HIDDEN, dtype=bool)
    kept[units.keep] = True
    assert 0 < kept.sum() < HIDDEN
    pruned = prune(zeroed, PruneConfig(plan=plan)).model
    assert [list(i.type.tensor_type.shape.dim) for i in pruned.graph.input] == \
        [list(i.type.tensor_type.shape.dim) for i in zeroed.graph.input]
    feed = random_input(zeroed, seed=1)
    (y, h, c), (y_pruned, h_pruned, c_pruned) = run(zeroed, feed), run(pruned, feed)
    np.testing.assert_allclose(y_pruned, y, rtol=1e-5, atol=1e-5)
    for full, got in ((h, h_pruned), (c, c_pruned)):
        assert got.shape == full.shape
        np.testing.assert_allclose(got[..., kept], full[..., kept], rtol=1e-5, atol=1e-5)
        assert not got[..., ~kept].any()


def test_a_batch_first_layer_is_left_whole_with_its_reason():
    from onnxprune import inspect

    groups = inspect(_single_layer(layout=1))["groups"]
    assert not any(g["sources"] == ["rnn"] for g in groups)
    [(prunable, reason)] = _reasons(groups, "proj")
    assert not prunable and "batch-first layout (layout=1) is not supported" in reason


@pytest.mark.parametrize("scorer", ["wanda", "pfp", "obs"])
def test_the_data_informed_scorers_read_the_units_a_recurrent_layer_consumes(scorer):
    """A recurrent layer's W is a consumer like a MatMul's weight: units it reads with zero columns (and,
    for its own units, zero columns of R) score below every other unit of their group."""
    from onnxprune.calib import input_specs, load_calibration
    from onnxprune.loading import load
    from onnxprune.scoring import ScoringContext, score
    from onnxprune.stages import analyze_model
    from tests.oracle import drop_every_other, zero_dropped

    zeroed, _ = zero_dropped(BUILDERS["lstm_bidirectional_stacked"]())
    loaded = load(zeroed)
    analysis = analyze_model(loaded)
    x = np.random.default_rng(0).standard_normal((16, STEPS, FEATURES)).astype(np.float32)
    calibration = load_calibration({"x": x}, input_specs(loaded.model, loaded.input_shapes))
    scores = score(analysis, scorer, ScoringContext(calibration=calibration, model=loaded.model, fixed_batch=1))
    keep = drop_every_other(analysis)
    for group in analysis.prunable_groups():
        if group.name in ("proj", "rnn0"):  # read by rnn0's and rnn1's W
            dead = np.setdiff1d(np.arange(group.channels), keep[group.index])
            assert scores[group.index][dead].max() < scores[group.index][keep[group.index]].min(), group.name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_recovery_refits_a_recurrent_layer_to_the_originals_gate_inputs(name):
    """A recurrent layer whose input lost channels is re-fitted to the original's product W x + B (its
    output is not that product): with dead channels removed the target is met before any fit (so the
    product, its kept rows and the packed bias are the original's); with live ones the fit lowers it."""
    from onnxprune import PruneConfig, prune
    from tests.oracle import zero_dropped

    x = np.random.default_rng(0).standard_normal((40, STEPS, FEATURES)).astype(np.float32)
    zeroed, plan = zero_dropped(BUILDERS[name]())
    layers = [l for l in prune(zeroed, PruneConfig(plan=plan, calibration={"x": x}, recover="lstsq"))
              .report["recovery"]["layers"] if l["name"].startswith("rnn")]
    assert layers and all(l["error_before"] < 1e-4 for l in layers)  # (float32 products: a floor near 1e-5)
    layers = [l for l in prune(BUILDERS[name](), PruneConfig(filters=0.5, scorer="l1", calibration={"x": x},
                                                              recover="lstsq")).report["recovery"]["layers"]
              if l["name"].startswith("rnn")]
    assert layers and all(l["status"] == "recovered" and l["error_after"] < l["error_before"] for l in layers)


@pytest.mark.parametrize("op", sorted(GATES))
def test_a_recurrent_layers_packed_bias_carries_the_offset_it_is_given(op):
    from onnxprune.ops.base import weighted

    gates, b = GATES[op], np.random.default_rng(0).standard_normal((2, 2 * GATES[op] * HIDDEN))
    handler, layout = weighted(op, {}, (2, gates * HIDDEN, FEATURES))
    offset = np.arange(2 * gates * HIDDEN, dtype=np.float64)
    for values in (b, None):
        packed = handler.with_bias_offset(layout, values, offset)
        np.testing.assert_allclose(handler.bias_offset(layout, packed), offset)
    np.testing.assert_allclose(handler.with_bias_offset(layout, b, offset)[:, gates * HIDDEN:], b[:, gates * HIDDEN:])


def test_a_recurrent_layer_of_a_model_with_external_data_is_recovered(tmp_path):
    """The original's weights of a model with external data are memory maps: recovery's target product
    reads them as such."""
    import onnx

    from onnxprune import PruneConfig, prune

    path = tmp_path / "model.onnx"
    onnx.save(BUILDERS["gru"](), str(path), save_as_external_data=True, location="model.data", size_threshold=1024)
    x = np.random.default_rng(0).standard_normal((24, STEPS, FEATURES)).astype(np.float32)
    layers = prune(path, PruneConfig(filters=0.5, scorer="l1", calibration={"x": x}, recover="lstsq")).report[
        "recovery"]["layers"]
    assert any(l["name"] == "rnn0" and l["status"] == "recovered" for l in layers), layers


def test_obs_gathers_a_recurrent_consumers_rows_once_per_sample():
    """A recurrent layer's input is [steps, batch, features]: obs's Gram matrices count each chosen row
    once, whatever the step count (the batch's samples are not its first axis)."""
    from onnxprune.calib import input_specs, load_calibration
    from onnxprune.loading import load
    from onnxprune.scoring import ScoringContext
    from onnxprune.scoring.consumers import find_consumers
    from onnxprune.scoring.obs import gram_folds
    from onnxprune.stages import analyze_model

    loaded = load(BUILDERS["rnn"]())
    analysis = analyze_model(loaded)
    x = np.random.default_rng(0).standard_normal((16, STEPS, FEATURES)).astype(np.float32)
    calibration = load_calibration({"x": x}, input_specs(loaded.model, loaded.input_shapes))
    context = ScoringContext(calibration=calibration, model=loaded.model, fixed_batch=1)
    consumers = [c for c in find_consumers(analysis) if c.node.op == "RNN"]
    (fold,) = gram_folds(analysis, context, consumers)
    assert fold.count + fold.held_count == len(fold.chosen) == 16 * STEPS
    assert fold.held_count == 3 * STEPS  # samples 4, 9, 14 are held out (calib.data.held_out)
