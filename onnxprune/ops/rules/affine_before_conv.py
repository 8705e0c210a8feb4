"""Arithmetic with per-channel constants right before a Conv that pads nothing (`conv(x * s + b)`: the
learnable affine PP-LCNet puts after each activation, read by a pointwise conv) becomes that Conv with
its filters scaled per input channel and `b` carried into its bias. A padded Conv would see the padding
as zeros of `x * s + b`, not of `x`, so it is left."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ._match import (LINEAR, affine_step, channel_vector, conv_weights, finite, onnx_op, other_input, set_conv_weights,
                     sole_reader)

log = logging.getLogger(__name__)

NAME = "affine_before_conv"
TRIGGERS = {"Conv"}  # ops a graph must all have for this rule to match


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Fold every such chain into the Conv reading it; the number of arithmetic nodes folded."""
    return sum(_fold(node, graph) for node in list(graph.nodes) if onnx_op(node, "Conv"))


def _unpadded(conv: gs.Node) -> bool:
    return (conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            and not any(conv.attrs.get("pads", ())) and conv.attrs.get("group", 1) == 1)


def _chain(conv: gs.Node, graph: gs.Graph, channels: int, rank: int) -> list[tuple[gs.Node, np.ndarray]]:
    """The arithmetic nodes before `conv`, first to last, each with its constant per channel."""
    chain, tensor = [], conv.inputs[0]
    while tensor.inputs and sole_reader(tensor, graph) is not None:
        node = tensor.inputs[0]
        data = next((t for t in node.inputs if not isinstance(t, gs.Constant)), None)
        if not onnx_op(node, *LINEAR) or data is None or (node.op in ("Sub", "Div") and node.inputs[0] is not data):
            break
        values = channel_vector(other_input(node, data), channels, rank)
        shape = data.shape
        if values is None or shape is None or len(shape) != rank or shape[1] != channels:
            break  # the constant could widen the data (a grayscale image minus a 3-channel mean): left
        chain.insert(0, (node, values))
        tensor = data
    return chain


def _fold(conv: gs.Node, graph: gs.Graph) -> int:
    weights = conv_weights(conv)
    if weights is None or not _unpadded(conv):
        return 0
    weight, bias = weights
    channels, rank = weight.shape[1], weight.ndim
    chain = _chain(conv, graph, channels, rank)
    if not chain:
        return 0
    scale, shift = np.ones(channels), np.zeros(channels)
    with np.errstate(divide="ignore", invalid="ignore"):
        for node, values in chain:
            scale, shift = affine_step(node.op, scale, shift, values)
    if not finite(scale, shift):
        log.debug("Conv '%s': the arithmetic before it divides by zero; not folded", conv.name)
        return 0
    filters = weight.astype(np.float64)
    old_bias = bias.astype(np.float64) if bias is not None else np.zeros(filters.shape[0])
    new_bias = old_bias + filters.reshape(filters.shape[0], channels, -1).sum(axis=2) @ shift
    filters = filters * scale.reshape((1, -1) + (1,) * (rank - 2))
    set_conv_weights(conv, filters, new_bias, f"{conv.name or conv.outputs[0].name}_input_folded")
    first = chain[0][0]
    conv.inputs[0] = next(t for t in first.inputs if not isinstance(t, gs.Constant))
    for node, _ in chain:
        node.inputs.clear()
        node.outputs.clear()
    return len(chain)
