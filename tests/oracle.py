"""The exactness oracle: make some channels contribute nothing, prune exactly those, compare outputs.

Channels contribute nothing when every layer that consumes them (Conv, ConvTranspose, Gemm, MatMul
reading them as input features) has zero weights for them. Then removing those channels, with every
per-channel constant, group count, split size and reshape target updated, must not change any output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.loading import load
from onnxprune.stages import analyze_model
from onnxprune.plan import Plan
from onnxprune.rewrite import keep_masks


def drop_every_other(analysis, seed: int = 0) -> dict[int, np.ndarray]:
    """Kept unit positions per prunable group: a seeded random half (at least one kept)."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group in analysis.prunable_groups():
        kept = np.flatnonzero(rng.random(group.channels) < 0.5)
        keep[group.index] = kept if len(kept) else np.array([0])
    return keep


def _zero_inputs(node: gs.Node, mask: np.ndarray, is_source: bool) -> None:
    weight = node.inputs[1]
    values = weight.values.copy()
    groups = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        per_group = values.shape[1]
        if groups > 1 and per_group == 1:
            return  # depthwise: channels flow on to the output, not consumed here
        values[:, ~mask.reshape(groups, per_group)[0]] = 0
    elif node.op == "ConvTranspose":
        if groups > 1 and groups == values.shape[0]:
            return
        values[~mask] = 0
    elif node.op == "Gemm":
        if node.attrs.get("transB", 0):
            values[:, ~mask] = 0
        else:
            values[~mask] = 0
    elif node.op == "MatMul" and is_source:
        values[~mask] = 0
    else:
        return
    node.inputs[1] = gs.Constant(weight.name + "_oracle", values)


def zero_dropped(model, keep_fn=drop_every_other, input_shapes=None):
    """(zeroed model, plan dropping exactly the zeroed channels)."""
    loaded = load(model, input_shapes)
    analysis = analyze_model(loaded)
    keep = keep_fn(analysis)
    masks = keep_masks(analysis, keep)
    sources = {id(s.node) for g in analysis.groups for s in g.sources}
    for node in analysis.graph.nodes:
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.inputs[0].name in masks \
                and isinstance(node.inputs[1], gs.Constant):
            _zero_inputs(node, masks[node.inputs[0].name], id(node) in sources)
    analysis.graph.cleanup()
    zeroed = gs.export_onnx(analysis.graph)
    zeroed.ir_version = loaded.model.ir_version
    return zeroed, Plan.from_keep(analysis, keep)
