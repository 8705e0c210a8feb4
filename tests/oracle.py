"""The exactness oracle: make some channels contribute nothing, prune exactly those, compare outputs.

Channels contribute nothing when every layer that consumes them (a weighted op reading them as input
features: Conv, ConvTranspose, Gemm, MatMul, ...; a recurrent layer's W reading its input features, and
its R reading its own hidden units at the next step) has zero weights for them. Then removing those channels, with every
per-channel constant, group count, split size and reshape target updated, must not change any output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxprune import PruneConfig, inspect, prune
from onnxprune.errors import NothingToPrune
from onnxprune.loading import load
from onnxprune.ops.base import weighted, weighted_ops, zero_inputs
from onnxprune.ops.recurrent import GATES
from onnxprune.stages import analyze_model
from onnxprune.plan import Plan
from onnxprune.rewrite import keep_masks
from tests.builders import random_input, run


def drop_every_other(analysis, seed: int = 0) -> dict[int, np.ndarray]:
    """Kept unit positions per prunable group: a seeded random half (at least one kept)."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group in analysis.prunable_groups():
        kept = np.flatnonzero(rng.random(group.channels) < 0.5)
        keep[group.index] = kept if len(kept) else np.array([0])
    return keep


def _zero_inputs(node: gs.Node, mask: np.ndarray, is_source: bool) -> None:
    """Zero the weights `node` reads dropped channels with, when it consumes them as input features."""
    found = weighted(node.op, node.attrs, node.inputs[1].values.shape)
    if found is None or not is_source:
        return  # not a weighted op, or the channels flow on (depthwise conv, MatMul on another axis)
    handler, layout = found
    values = zero_inputs(handler, layout, node.inputs[1].values, mask)
    node.inputs[1] = gs.Constant(node.inputs[1].name + "_oracle", values)


def _zero_recurrence(node: gs.Node, masks: dict) -> None:
    """Zero a recurrent layer's W columns of dropped input features and R columns of dropped units."""
    hidden = masks.get(node.outputs[0].name)
    for index, mask in ((1, masks.get(node.inputs[0].name)), (2, hidden)):
        if mask is not None and isinstance(node.inputs[index], gs.Constant):
            node.inputs[index] = gs.Constant(node.inputs[index].name + "_oracle", node.inputs[index].values * mask)


def zero_dropped(model, keep_fn=drop_every_other, input_shapes=None, simplify: bool = True):
    """(zeroed model, plan dropping exactly the zeroed channels); `simplify`: as in `PruneConfig`."""
    loaded = load(model, input_shapes, simplify=simplify)
    analysis = analyze_model(loaded)
    keep = keep_fn(analysis)
    masks = keep_masks(analysis, keep)
    sources = {id(s.node) for g in analysis.groups for s in g.sources}
    for node in analysis.graph.nodes:
        if node.op in weighted_ops() and node.inputs[0].name in masks and isinstance(node.inputs[1], gs.Constant):
            _zero_inputs(node, masks[node.inputs[0].name], id(node) in sources)
        if node.op in GATES:
            _zero_recurrence(node, masks)
    analysis.graph.cleanup()
    zeroed = gs.export_onnx(analysis.graph)
    zeroed.ir_version = loaded.model.ir_version
    return zeroed, Plan.from_keep(analysis, keep)


def assert_pruning_dead_channels_is_exact(model: onnx.ModelProto, seed: int, simplify: bool = True) -> None:
    """Zero a seeded half of every prunable group's inputs, prune exactly those: outputs do not change."""
    zeroed, plan = zero_dropped(model, keep_fn=lambda a: drop_every_other(a, seed), simplify=simplify)
    assert any(g.keep != list(range(g.channels)) for g in plan.groups), "the oracle must drop something"
    result = prune(zeroed, PruneConfig(plan=plan, simplify=simplify))
    feed = random_input(zeroed, seed=seed)
    for expected, got in zip(run(zeroed, feed), run(result.model, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert result.report["after"]["macs"] < result.report["before"]["macs"]
    assert result.report["after"]["params"] < result.report["before"]["params"]


def assert_exact_on(model: onnx.ModelProto, feed: dict, seed: int = 0):
    """The oracle's plan (a seeded half of every prunable group dropped, those channels zeroed) pruned: the
    outputs on `feed` (another batch or sequence length than the analysed one) are the zeroed model's.
    Returns the prune's result."""
    zeroed, plan = zero_dropped(model, keep_fn=lambda a: drop_every_other(a, seed))
    result = prune(zeroed, PruneConfig(plan=plan))
    for expected, got in zip(run(zeroed, feed), run(result.model, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    return result


def assert_left_whole(model: onnx.ModelProto, reason: str, simplify: bool = True) -> None:
    """Nothing is pruned, and the groups' reasons say why."""
    try:
        prune(model, PruneConfig(filters=0.5, simplify=simplify))
    except NothingToPrune as error:
        assert "nothing to prune" in str(error)
    else:
        raise AssertionError("a blocked pattern was pruned")
    reasons = " ".join(r for g in inspect(model, simplify=simplify)["groups"] for r in g["reasons"])
    assert reason in reasons


def family_tests(builders: dict, blocked: dict[str, str], simplify: bool = True):
    """The exactness-oracle and blocking tests of one op family (builders: name -> builder; blocked:
    name -> the reason expected), to assign to test names in the family's module (None: no blocked case);
    `simplify=False`: the models as built, not rewritten by ops.rules (an op a rule spells out otherwise)."""

    @pytest.mark.parametrize("seed", [0, 1])
    @pytest.mark.parametrize("name", sorted(n for n in builders if n not in blocked))
    def exact(name, seed):
        assert_pruning_dead_channels_is_exact(builders[name](), seed, simplify)

    @pytest.mark.parametrize("name", sorted(blocked))
    def left_whole(name):
        assert_left_whole(builders[name](), blocked[name], simplify)

    return exact, (left_whole if blocked else None)
