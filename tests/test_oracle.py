"""Exactness oracle for every op handler: pruning channels that contribute nothing changes nothing."""

import numpy as np
import pytest

import models
from oracle import drop_every_other, zero_dropped
from onnxprune import PruneConfig, prune
from onnxprune.errors import NothingToPrune

BUILDERS = models.all_builders()
PRUNABLE = {k: v for k, v in BUILDERS.items() if not k.startswith("blocked_")}
BLOCKED = {k: v for k, v in BUILDERS.items() if k.startswith("blocked_")}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(PRUNABLE))
def test_pruning_dead_channels_is_exact(name, seed):
    zeroed, plan = zero_dropped(PRUNABLE[name](), keep_fn=lambda a: drop_every_other(a, seed))
    assert any(g.keep != list(range(g.channels)) for g in plan.groups), "the oracle must drop something"
    result = prune(zeroed, PruneConfig(plan=plan))
    feed = models.random_input(zeroed, seed=seed)
    expected, got = models.run(zeroed, feed), models.run(result.model, feed)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    assert result.report["after"]["macs"] < result.report["before"]["macs"]
    assert result.report["after"]["params"] < result.report["before"]["params"]


def test_oracle_detects_a_wrong_slice():
    """The oracle can fail: pruning channels that do contribute changes the outputs."""
    model = PRUNABLE["residual"]()
    _, plan = zero_dropped(model)
    result = prune(model, PruneConfig(plan=plan))
    feed = models.random_input(model)
    assert not np.allclose(models.run(model, feed)[0], models.run(result.model, feed)[0], atol=1e-3)


EXPECTED_REASON = {
    "blocked_graph_output": "graph output 'feat'",
    "blocked_softmax": "Softmax",
    "blocked_layernorm": "LayerNormalization",
    "blocked_topk": "no handler",
    "blocked_einsum": "no handler",
    "blocked_shape_read": "the channel count is read",
}


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_blocked_patterns_are_left_whole_with_a_reason(name):
    with pytest.raises(NothingToPrune) as info:
        prune(BLOCKED[name](), PruneConfig(filters=0.5))
    assert "nothing to prune" in str(info.value)
    from onnxprune import inspect
    reasons = " ".join(r for g in inspect(BLOCKED[name]())["groups"] for r in g["reasons"])
    assert EXPECTED_REASON[name] in reasons


def test_group_norm_opset18_per_group_scale():
    """Opset-18 GroupNormalization (per-group scale) is refused by onnx's checker but run by
    onnxruntime: the rewrite is still exact, and the report says the input fails the checker too."""
    model = models.checker_rejected_builders()["group_norm_opset18"]()
    zeroed, plan = zero_dropped(model)
    result = prune(zeroed, PruneConfig(plan=plan))
    assert result.report["checker"]["passed"] is False and "input model" in result.report["checker"]["note"]
    feed = models.random_input(zeroed)
    np.testing.assert_allclose(models.run(result.model, feed)[0], models.run(zeroed, feed)[0], rtol=1e-5, atol=1e-5)
