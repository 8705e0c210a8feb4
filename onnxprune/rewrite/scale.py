"""Re-weight consumers' input channels: PFP's sample mode scales each kept channel's outgoing weights.

Applied to the unpruned graph before channel slicing (so positions are the original ones): the input
weights of every consumer (Conv, Gemm, MatMul reading the channels as input features) are multiplied by
the factor of the unit each input channel belongs to. A weight another node shares is copied first.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.analysis import Analysis
from ..ops.base import attr
from ..scoring.consumers import find_consumers


def apply_unit_scales(analysis: Analysis, scales: dict[int, np.ndarray]) -> int:
    """Scale consumer input weights by per-unit factors (`scales`: group index -> factor per unit), in
    place. Returns the number of layers changed."""
    if not scales:
        return 0
    unit_scale = np.ones(len(analysis.label))
    for group_index, factors in scales.items():
        unit_scale[analysis.groups[group_index].unit_labels] = factors
    changed = 0
    for consumer in find_consumers(analysis):
        factors = unit_scale[consumer.units]
        if np.all(factors == 1.0):
            continue
        node = consumer.node
        weight = node.inputs[1].values
        scaled = (weight * _broadcast(node, weight, factors)).astype(weight.dtype)
        _replace_weight(node, scaled)
        changed += 1
    return changed


def _broadcast(node: gs.Node, weight: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """`factors` (one per input channel) shaped to multiply `weight` along its input-channel axis."""
    if node.op == "Conv":
        groups = int(attr(node, "group", 1))
        per_group = weight.shape[1]
        blocks = factors.reshape(groups, 1, per_group)  # filters of block b read input channels of block b
        full = np.broadcast_to(blocks, (groups, weight.shape[0] // groups, per_group)).reshape(weight.shape[0], per_group)
        return full.reshape(full.shape + (1,) * (weight.ndim - 2))
    if node.op == "ConvTranspose":  # weight [C_in, C_out / group, *kernel]
        return factors.reshape((-1,) + (1,) * (weight.ndim - 1))
    if node.op == "Gemm" and attr(node, "transB", 0):
        return factors[None, :]
    return factors[:, None]  # Gemm without transB, MatMul: weight is [input features, outputs]


def _replace_weight(node: gs.Node, values: np.ndarray) -> None:
    old = node.inputs[1]
    if len(old.outputs) == 1:
        old.values = values
    else:
        node.inputs[1] = gs.Constant(f"{old.name}_rescaled_{node.name}", values)
