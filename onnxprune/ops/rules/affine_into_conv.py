"""A Conv followed by arithmetic with per-channel constants (`y = (conv(x) * s + b) ...`: Mul, Add, Sub,
Div, as paddle2onnx writes a learnable affine or a BatchNorm) becomes one Conv with scaled filters and
bias. onnxruntime fuses such a Mul or Add only when the constant is the op's second input; paddle2onnx
writes it first, so on PP-OCR models every one of these runs as a pass over the whole tensor."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ._match import affine_step, channel_vector, other_input, sole_reader

log = logging.getLogger(__name__)

NAME = "affine_into_conv"
LINEAR = ("Mul", "Add", "Sub", "Div")


def apply(graph: gs.Graph) -> int:
    """Fold every such chain into its Conv; the number of arithmetic nodes folded."""
    folded = 0
    for node in list(graph.nodes):
        if node.op == "Conv":
            folded += _fold(node, graph)
    return folded


def _fold(conv: gs.Node, graph: gs.Graph) -> int:
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if not isinstance(weight, gs.Constant) or weight.values.dtype.kind != "f":
        return 0
    if bias is not None and not isinstance(bias, gs.Constant):
        return 0
    channels, rank = weight.values.shape[0], weight.values.ndim
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
        if not all(np.all(np.isfinite(v)) for v in folded):
            log.debug("%s '%s' after Conv '%s' not folded: it divides by zero", reader.op, reader.name, conv.name)
            break
        scale, shift = folded
        eaten.append(reader)
        end = reader.outputs[0]
    if not eaten:
        return 0
    dtype = weight.values.dtype
    filters = weight.values.astype(np.float64) * scale.reshape((-1,) + (1,) * (rank - 1))
    old_bias = bias.values.astype(np.float64) if bias is not None else np.zeros(channels)
    conv.inputs[1] = gs.Constant(f"{conv.name or end.name}_folded_weight", filters.astype(dtype))
    new_bias = gs.Constant(f"{conv.name or end.name}_folded_bias", (old_bias * scale + shift).astype(dtype))
    if len(conv.inputs) > 2:
        conv.inputs[2] = new_bias
    else:
        conv.inputs.append(new_bias)
    eaten[-1].outputs.clear()
    conv.outputs = [end]
    for node in eaten:
        node.inputs.clear()
    return len(eaten)
