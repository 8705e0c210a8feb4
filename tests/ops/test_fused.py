"""onnxruntime's fused ops (com.microsoft domain, as onnxruntime.transformers.optimizer writes them):
BiasGelu, FastGelu and QuickGelu pass channels and slice their bias; SkipLayerNormalization blocks the
hidden size it normalises; a model importing the com.microsoft opset loads and inspects."""

from __future__ import annotations

import math

import numpy as np

from onnxprune import inspect
from tests.builders import Builder
from tests.oracle import family_tests

MICROSOFT = {"com.microsoft": 1}
SEQUENCE = [1, 5, 16]


def _skip_layer_norm(b: Builder, name: str, x: str, skip: str, width: int) -> str:
    """SkipLayerNormalization(x, skip, gamma, beta, bias) over the last axis."""
    params = [b.const(f"{name}.gamma", b.rng.uniform(0.5, 1.5, width)), b.randn(f"{name}.beta", [width], 0.1),
              b.randn(f"{name}.bias", [width], 0.1)]
    return b.node("SkipLayerNormalization", name, [x, skip, *params], domain="com.microsoft", epsilon=1e-5)


def fused_ffn(seed: int = 0):
    """x [1,5,16] -> fc1(16->32) -> BiasGelu(bias[32]) -> fc2(32->16) -> SkipLayerNormalization(skip x)
    -> fc3(16->8): a fused BERT feed-forward block.

    Prunable: fc1's 32 channels (BiasGelu's bias is sliced). fc2's 16 are blocked by the normalisation.
    """
    b = Builder(seed)
    h = b.node("BiasGelu", "gelu1", [b.matmul("fc1", "x", 16, 32), b.randn("gelu1.bias", [32], 0.1)],
               domain="com.microsoft")
    h = _skip_layer_norm(b, "skip_norm1", b.matmul("fc2", h, 32, 16), "x", 16)
    b.output(b.matmul("fc3", h, 16, 8))
    return b.model([("x", SEQUENCE)], outputs=[("y", [1, 5, 8])], name="fused_ffn", domains=MICROSOFT)


def fast_gelu(seed: int = 0):
    """x [1,5,16] -> fc1(16->32) -> FastGelu(bias[32]) -> fc2(32->24) -> QuickGelu -> fc3(24->8).

    Prunable: fc1's 32 channels and fc2's 24.
    """
    b = Builder(seed)
    h = b.node("FastGelu", "gelu1", [b.matmul("fc1", "x", 16, 32), b.randn("gelu1.bias", [32], 0.1)],
               domain="com.microsoft")
    h = b.node("QuickGelu", "gelu2", [b.matmul("fc2", h, 32, 24)], domain="com.microsoft", alpha=1.702)
    b.output(b.node("MatMul", "fc3", [h, b.randn("fc3.weight", [24, 8], 1 / math.sqrt(24))]))
    return b.model([("x", SEQUENCE)], outputs=[("y", [1, 5, 8])], name="fast_gelu", domains=MICROSOFT)


def blocked_skip_layer_norm(seed: int = 0):
    """x [1,5,16] -> fc1(16->16) -> SkipLayerNormalization(skip x) -> fc2(16->8).

    Blocked: fc1's channels are the hidden size the normalisation mixes.
    """
    b = Builder(seed)
    h = _skip_layer_norm(b, "skip_norm1", b.matmul("fc1", "x", 16, 16), "x", 16)
    b.output(b.matmul("fc2", h, 16, 8))
    return b.model([("x", SEQUENCE)], outputs=[("y", [1, 5, 8])], name="blocked_skip_layer_norm",
                   domains=MICROSOFT)


BUILDERS = {
    "fused_ffn": fused_ffn,
    "fast_gelu": fast_gelu,
    "blocked_skip_layer_norm": blocked_skip_layer_norm,
}
BLOCKED = {"blocked_skip_layer_norm": "normalises across the channel axis (the hidden size)"}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


def test_a_model_importing_the_microsoft_opset_inspects_with_its_coverage():
    report = inspect(fused_ffn())
    reasons = [r for g in report["groups"] for r in g.get("reasons", [])]
    assert not any("no handler" in r for r in reasons), reasons
    assert [g["channels"] for g in report["groups"] if g["prunable"]] == [32]
    assert np.isclose(report["coverage"], 32 / (32 + 16 + 8))
