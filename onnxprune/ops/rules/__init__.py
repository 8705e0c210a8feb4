"""Exact rewrites of op patterns that onnxruntime leaves unfused, applied before the analysis so that the
result of every run (pruned or not) is faster on any runtime: one rule per module, each with `NAME` and
`apply(graph, shapes) -> int` (how many times it rewrote; why a candidate was left is logged at debug
level). The rewritten graph computes the same outputs up to float rounding; validation compares the
result with the original's outputs, so any difference is measured with the rest."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from . import affine_before_conv, affine_into_conv, hard_swish

log = logging.getLogger(__name__)

RULES = (affine_into_conv, hard_swish, affine_before_conv)


def simplify(graph: gs.Graph, shapes: dict) -> dict[str, int]:
    """Apply every rule to `graph` in place (`shapes` gains the shapes of tensors a rule makes); the count
    of each rule that rewrote something."""
    counts = {}
    for rule in RULES:
        count = rule.apply(graph, shapes)
        if count:
            counts[rule.NAME] = count
    if counts:
        graph.cleanup().toposort()
        log.info("simplified: %s", ", ".join(f"{n} {name}" for name, n in counts.items()))
    return counts
