"""A Conv followed by arithmetic with per-channel constants (`y = (conv(x) * s + b) ...`: Mul, Add, Sub,
Div, as paddle2onnx writes a learnable affine or a BatchNorm) becomes one Conv with scaled filters and
bias. onnxruntime fuses such a Mul or Add only when the constant is the op's second input; paddle2onnx
writes it first, so on PP-OCR models every one of these runs as a pass over the whole tensor."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ._match import (LINEAR, affine_step, channel_vector, conv_weights, finite, onnx_op, other_input, set_conv_weights,
                     sole_reader)

log = logging.getLogger(__name__)

NAME = "affine_into_conv"
TRIGGERS = {"Conv"}  # ops a graph must all have for this rule to match


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Fold every such chain into its Conv; the number of arithmetic nodes folded."""
    return sum(_fold(node, graph) for node in list(graph.nodes) if onnx_op(node, "Conv"))


def _fold(conv: gs.Node, graph: gs.Graph) -> int:
    weights = conv_weights(conv)
    if weights is None:
        return 0
    weight, bias = weights
    channels, rank = weight.shape[0], weight.ndim
    scale, shift = np.ones(channels), np.zeros(channels)
    eaten, end = [], conv.outputs[0]
    while (reader := sole_reader(end, graph)) is not None and reader.op in LINEAR:
        constant = other_input(reader, end)
        values = channel_vector(constant, channels, rank) if constant is not None else None
        if values is None or (reader.op in ("Sub", "Div") and reader.inputs[0] is not end):
            log.debug("%s '%s' after Conv '%s' not folded: not x op (a constant per channel)", reader.op, reader.name, conv.name)
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            folded = affine_step(reader.op, scale, shift, values)
        if not finite(*folded):
            log.debug("%s '%s' after Conv '%s' not folded: it divides by zero", reader.op, reader.name, conv.name)
            break
        scale, shift = folded
        eaten.append(reader)
        end = reader.outputs[0]
    if not eaten:
        return 0
    filters = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (rank - 1))
    old_bias = bias.astype(np.float64) if bias is not None else np.zeros(channels)
    set_conv_weights(conv, filters, old_bias * scale + shift, f"{conv.name or end.name}_folded")
    eaten[-1].outputs.clear()
    conv.outputs = [end]
    for node in eaten:
        node.inputs.clear()
    return len(eaten)
