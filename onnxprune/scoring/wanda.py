"""Wanda for channels (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
Language Models", 2023): a weight's importance is |W_fj| times the norm of its input feature j over the
calibration data; a channel's score sums that over every weight reading it, in every consumer layer.

The norm is the root mean square over samples and positions (not the plain L2 norm), so consumers at
different resolutions weigh alike; within one layer the ranking is the paper's.
"""

from __future__ import annotations

import numpy as np

from .activation import tensor_stats
from .base import register_scorer
from .consumers import find_consumers
from .magnitude import l1


@register_scorer("wanda")
def wanda(analysis, context):
    """sum over consumers, features and kernel offsets of |W| x RMS of the input channel."""
    consumers = find_consumers(analysis)
    stats = tensor_stats(analysis, context, {c.tensor: analysis.maps[c.tensor].axis for c in consumers})
    total = np.zeros(len(analysis.label))
    read = np.zeros(len(analysis.label), dtype=bool)
    for consumer in consumers:
        np.add.at(total, consumer.units, consumer.channel_weight_sums() * stats[consumer.tensor].rms)
        read[consumer.units] = True
    fallback = None
    scores = {}
    for group in analysis.prunable_groups():
        if read[group.unit_labels].any():
            scores[group.index] = total[group.unit_labels]
        else:
            fallback = fallback or l1(analysis, context)
            scores[group.index] = fallback[group.index]
            context.notes.append(f"wanda: group {group.name!r} feeds no Conv/Gemm/MatMul: scored by L1")
    return scores
