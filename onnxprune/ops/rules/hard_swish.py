"""Hard swish written out, `x * Clip(x + 3, 0, 6) / 6` (paddle2onnx's Add, Clip, Mul, Div; also with the
division before the product or as a product by 1/6), becomes onnxruntime's HardSwish (opset 14 and
newer) or `x * HardSigmoid(x)` (alpha 1/6, beta 1/2): one or two passes over the tensor instead of four."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ._match import float_tensor, onnx_op, other_input, scalar, sole_reader

log = logging.getLogger(__name__)

NAME = "hard_swish"
TRIGGERS = {"Clip"}  # ops a graph must all have for this rule to match
HARD_SWISH_OPSET = 14


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Rewrite every match; how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if onnx_op(node, "Add") and node.outputs:
            match = _match(node, graph)
            if match is not None:
                _replace(graph, *match)
                rewritten += 1
    return rewritten


def _is_sixth(node: gs.Node, tensor) -> bool:
    """`node` divides `tensor` by 6 or multiplies it by 1/6."""
    value = scalar(other_input(node, tensor))
    if node.op == "Div" and node.inputs[0] is tensor:
        return value == 6.0
    return node.op == "Mul" and value is not None and np.isclose(value, 1 / 6, rtol=1e-6, atol=0)


def _match(add: gs.Node, graph: gs.Graph):
    """(x, the nodes matched, the output) for `add` = x + 3 starting a hard swish, else None."""
    x = next((t for t in add.inputs if scalar(t) is None), None)
    if x is None or scalar(other_input(add, x)) != 3.0:
        return None
    clip = sole_reader(add.outputs[0], graph)
    if clip is None or clip.op != "Clip" or [scalar(t) for t in clip.inputs[1:]] != [0.0, 6.0]:
        return None
    first = sole_reader(clip.outputs[0], graph)
    if first is None:
        return None
    if first.op == "Mul" and other_input(first, clip.outputs[0]) is x:  # x * clip, then / 6
        last = sole_reader(first.outputs[0], graph)
        if last is None or not _is_sixth(last, first.outputs[0]):
            return None
    elif _is_sixth(first, clip.outputs[0]):  # clip / 6, then x *
        last = sole_reader(first.outputs[0], graph)
        if last is None or last.op != "Mul" or other_input(last, first.outputs[0]) is not x:
            return None
    else:
        log.debug("Add '%s' + Clip '%s' not rewritten: not followed by x * . / 6", add.name, clip.name)
        return None
    constants = [t for node in (add, clip, first, last) for t in node.inputs if isinstance(t, gs.Constant)]
    rank = len(x.shape) if x.shape is not None else 0
    if not float_tensor(x) or any(c.values.ndim > rank for c in constants):
        log.debug("Add '%s': x is not known to be floating point, or a constant widens it", add.name)
        return None
    return x, (add, clip, first, last), last.outputs[0]


def _replace(graph: gs.Graph, x, nodes, output) -> None:
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    if graph.opset >= HARD_SWISH_OPSET:
        graph.nodes.append(gs.Node("HardSwish", name=f"{output.name}_hard_swish", inputs=[x], outputs=[output]))
        return
    gate = gs.Variable(f"{output.name}_hard_sigmoid", dtype=output.dtype, shape=output.shape)
    graph.nodes.append(gs.Node("HardSigmoid", name=gate.name, attrs={"alpha": 1 / 6, "beta": 0.5},
                               inputs=[x], outputs=[gate]))
    graph.nodes.append(gs.Node("Mul", name=f"{output.name}_hard_swish", inputs=[x, gate], outputs=[output]))
