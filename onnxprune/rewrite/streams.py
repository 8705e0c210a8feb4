"""The round-one pruned stream for re-choosing obs's channels (scoring/reselect.py): models that compute every
group's full width while their consumers read only the channels a first choice keeps."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..io import export_graph, unload_maps
from ..scoring.consumers import find_consumers
from .channels import replace_constant
from .scale import apply_unit_scales


def masked_model(analysis, keep: dict[int, np.ndarray], ir_version: int):
    """The analysed model with every consumer's input weights of the channels `keep` drops zeroed (in
    place on `analysis.graph`, which is used up)."""
    scales = {}
    for group in analysis.prunable_groups():
        if group.index in keep and len(keep[group.index]) < group.channels:
            scales[group.index] = np.zeros(group.channels)
            scales[group.index][keep[group.index]] = 1.0
    unload_maps(analysis.graph)
    apply_unit_scales(analysis, scales)
    model = export_graph(analysis.graph)
    model.ir_version = ir_version
    return model


def gathered_model(analysis, keep: dict[int, np.ndarray], ir_version: int):
    """The analysed model with every consumer reading only the channels `keep` keeps (a Gather before it, its
    weight sliced to match), while every producer still computes all its channels (in place on
    `analysis.graph`, which is used up). Recovery re-fits its consumers to the original's full outputs: the
    pruned, re-fitted stream with each group's full width. A grouped (not depthwise) conv has its dropped
    inputs' weights zeroed instead."""
    kept_label = np.ones(len(analysis.label), dtype=bool)
    for group in analysis.prunable_groups():
        if group.index in keep:
            dropped = np.ones(group.channels, dtype=bool)
            dropped[keep[group.index]] = False
            kept_label[group.unit_labels[dropped]] = False
    unload_maps(analysis.graph)
    for consumer in find_consumers(analysis):
        mask = kept_label[consumer.units]
        if mask.all():
            continue
        node = consumer.node
        indices, weight = consumer.handler.narrowed(consumer.layout, node.inputs[1].values, mask)
        replace_constant(node, 1, weight, lambda: f"{node.inputs[1].name}_kept_{node.name}")  # noqa: B023
        if indices is None:  # the dropped inputs' weights are zeroed instead
            continue
        source = node.inputs[0]
        axis = consumer.axis if consumer.axis >= 0 else consumer.axis + len(analysis.shapes[source.name])
        gathered = gs.Variable(f"{source.name}_kept_{node.name}", dtype=source.dtype)
        analysis.graph.nodes.append(gs.Node("Gather", f"{node.name}_kept", {"axis": axis},
                                            [source, gs.Constant(f"{node.name}_kept_indices", indices)], [gathered]))
        node.inputs[0] = gathered
    analysis.graph.toposort()
    model = export_graph(analysis.graph)
    model.ir_version = ir_version
    return model
