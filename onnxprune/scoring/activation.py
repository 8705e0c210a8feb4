"""Mean absolute activation per channel, on the calibration data (a data-informed baseline).

A channel's score is the mean |a| of its values where its group's consumer layers read it (averaged
over those consumers' inputs); a group no consumer reads is measured at its sources' outputs.
"""

from __future__ import annotations

import numpy as np

from ..calib.capture import stream_activations
from ..calib.stats import ChannelStats, capture_batch_size
from ..errors import UsageError
from .base import register_scorer
from .consumers import find_consumers


def tensor_stats(analysis, context, axes: dict[str, int]) -> dict[str, ChannelStats]:
    """Per-channel statistics of the tensors `axes` names (name -> channel axis), in one pass."""
    if context.model is None or context.calibration is None:
        raise UsageError("data-informed scorers need the model and calibration data (use onnxprune.prune)")
    names = sorted(axes)
    stats = {name: ChannelStats(axes[name]) for name in names}
    batch = capture_batch_size(analysis.shapes, names, context.batch_size, context.fixed_batch)
    for acts in stream_activations(context.model, names, context.fit_data(), batch, progress="activation statistics"):
        for name in names:
            stats[name].update(acts[name])
    return stats


def _measured_tensors(analysis) -> dict[str, int]:
    """Consumer inputs, plus source outputs of groups that no consumer reads: name -> channel axis."""
    consumers = find_consumers(analysis)
    axes = {c.tensor: analysis.maps[c.tensor].axis for c in consumers}
    read = set()
    for c in consumers:
        read.update(analysis.group_of[c.units].tolist())
    for group in analysis.prunable_groups():
        if group.index not in read:
            for source in group.sources:
                axes[source.tensor] = analysis.maps[source.tensor].axis
    return axes


@register_scorer("activation")
def activation(analysis, context):
    """Mean |activation| of each channel where the next layers read it."""
    axes = _measured_tensors(analysis)
    stats = tensor_stats(analysis, context, axes)
    total = np.zeros(len(analysis.label))
    seen = np.zeros(len(analysis.label))
    for name, stat in stats.items():
        units = analysis.label[analysis.maps[name].ids.ravel()]
        np.add.at(total, units, stat.mean_abs)
        np.add.at(seen, units, 1.0)
    mean = np.divide(total, seen, out=np.zeros_like(total), where=seen > 0)
    return {g.index: mean[g.unit_labels] for g in analysis.prunable_groups()}
