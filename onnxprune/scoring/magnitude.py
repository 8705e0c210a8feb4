"""Data-free scorers: filter norms (L1, L2), BatchNorm scale, random."""

from __future__ import annotations

import numpy as np

from ..ops import handler_for
from .base import accumulate, register_scorer


def _filter_norms(analysis, order: int) -> dict[int, np.ndarray]:
    scores = {}
    for group in analysis.prunable_groups():
        total = np.zeros(group.channels)
        for source in group.sources:
            weights = handler_for(source.node.op, source.node.domain).filter_weights(source.node).astype(np.float64)
            norms = np.abs(weights).sum(1) if order == 1 else np.sqrt((weights * weights).sum(1))
            accumulate(analysis, group, analysis.maps[source.tensor].ids, norms, total)
        scores[group.index] = total
    return scores


@register_scorer("l1", uses_data=False)
def l1(analysis, context):
    """Sum over the group's filters of their L1 norms."""
    return _filter_norms(analysis, 1)


@register_scorer("l2", uses_data=False)
def l2(analysis, context):
    """Sum over the group's filters of their L2 norms."""
    return _filter_norms(analysis, 2)


@register_scorer("bn", uses_data=False)
def bn_scale(analysis, context):
    """|gamma| of the normalisation layers in the group (Network Slimming); L1 where a group has none."""
    fallback = _filter_norms(analysis, 1)
    nodes = {n.name: n for n in analysis.graph.nodes}
    scores, without = {}, 0
    for group in analysis.prunable_groups():
        total, found = np.zeros(group.channels), False
        for name in group.members:
            node = nodes[name]
            handler = handler_for(node.op, node.domain)
            scales = handler.channel_scales(node) if handler else None
            if scales is not None:
                accumulate(analysis, group, analysis.maps[node.inputs[0].name].ids, scales, total)
                found = True
        if not found:
            without += 1
        scores[group.index] = total if found else fallback[group.index]
    if without:
        context.notes.append(f"bn scorer: {without} group(s) have no normalisation layer and were scored by L1")
    return scores


@register_scorer("random", uses_data=False)
def random(analysis, context):
    """Uniform random scores from --seed: the baseline any scorer must beat."""
    rng = np.random.default_rng(context.seed)
    return {g.index: rng.random(g.channels) for g in analysis.prunable_groups()}
