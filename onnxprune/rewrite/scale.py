"""Re-weight consumers' input channels: PFP's sample mode scales each kept channel's outgoing weights.

Applied to the unpruned graph before channel slicing (so positions are the original ones): the input
weights of every consumer (Conv, Gemm, MatMul reading the channels as input features) are multiplied by
the factor of the unit each input channel belongs to. A weight another node shares is copied first, and
copies that come out equal (readers of one weight have joined channels) are one tensor again.
"""

from __future__ import annotations

import numpy as np

from ..graph.analysis import Analysis
from ..ops.base import scale_inputs
from ..scoring.consumers import find_consumers
from .channels import merge_equal_copies, replace_constant


def apply_unit_scales(analysis: Analysis, scales: dict[int, np.ndarray]) -> None:
    """Scale consumer input weights by per-unit factors (`scales`: group index -> factor per unit), in
    place."""
    if not scales:
        return
    unit_scale = np.ones(len(analysis.label))
    for group_index, factors in scales.items():
        unit_scale[analysis.groups[group_index].unit_labels] = factors
    copies = {}
    for consumer in find_consumers(analysis):
        factors = unit_scale[consumer.units]
        if np.all(factors == 1.0):
            continue
        node = consumer.node
        scaled = scale_inputs(consumer.handler, consumer.layout, node.inputs[1].values, factors)
        replace_constant(node, 1, scaled, lambda: f"{node.inputs[1].name}_rescaled_{node.name}", copies)  # noqa: B023
    merge_equal_copies(copies)
