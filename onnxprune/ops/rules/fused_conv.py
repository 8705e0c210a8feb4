"""onnxruntime's FusedConv (com.microsoft; what its ORT_ENABLE_EXTENDED level writes) spelled out as
ONNX's ops again: `activation(Conv(X, W, B) + Z)` becomes Conv, an Add of Z when given, and the
activation. onnxruntime fuses them back when it loads the result, so nothing is slower; every stage
after loading then sees plain Convs (recovery re-fits a Conv's product, which a FusedConv hides behind
its activation; the latency model times ONNX's ops) and the result runs on any runtime."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..base import MICROSOFT, text
from ._match import float_tensor, unused_name

log = logging.getLogger(__name__)

NAME = "fused_conv"
TRIGGERS = {"FusedConv"}  # ops a graph must all have for this rule to match
RESIDUAL = 3  # FusedConv's input Z


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Rewrite every FusedConv whose activation ONNX has; how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op == "FusedConv" and node.domain == MICROSOFT and node.outputs:
            activation = _activation(node, graph)
            if activation is None:
                log.debug("FusedConv '%s' left: activation %r has no ONNX op here", node.name, node.attrs.get("activation"))
                continue
            _replace(graph, node, *activation)
            rewritten += 1
    return rewritten


def _activation(node: gs.Node, graph: gs.Graph) -> tuple[str, dict, list] | None:
    """(ONNX op, its attributes, its extra constant inputs) of the node's activation, None when unknown."""
    name = text(node.attrs.get("activation", ""))
    params = [float(p) for p in node.attrs.get("activation_params", [])]
    dtype = node.outputs[0].dtype if float_tensor(node.outputs[0]) else np.float32
    if name in ("Relu", "Tanh", "Sigmoid") and not params:
        return name, {}, []
    if name == "LeakyRelu" and len(params) == 1:
        return name, {"alpha": params[0]}, []
    if name == "HardSigmoid" and len(params) == 2:
        return name, {"alpha": params[0], "beta": params[1]}, []
    if name == "Clip" and len(params) == 2 and graph.opset >= 11:
        bounds = [gs.Constant(unused_name(graph, f"{node.outputs[0].name}_clip_{end}"), np.array(value, dtype=dtype))
                  for end, value in zip(("min", "max"), params)]
        return name, {}, bounds
    return None


def _replace(graph: gs.Graph, fused: gs.Node, op: str, attrs: dict, extra: list) -> None:
    output = fused.outputs[0]
    inputs = list(fused.inputs)
    residual = inputs[RESIDUAL] if len(inputs) > RESIDUAL and inputs[RESIDUAL].name else None
    conv_attrs = {k: v for k, v in fused.attrs.items() if k not in ("activation", "activation_params")}
    product = gs.Variable(unused_name(graph, f"{output.name}_conv"), dtype=output.dtype, shape=output.shape)
    fused.inputs.clear()
    fused.outputs.clear()
    conv_inputs = inputs[:3]
    while not conv_inputs[-1].name:  # an omitted bias before Z
        conv_inputs.pop()
    graph.nodes.append(gs.Node("Conv", name=fused.name, attrs=conv_attrs, inputs=conv_inputs, outputs=[product]))
    if residual is not None:
        summed = gs.Variable(unused_name(graph, f"{output.name}_sum"), dtype=output.dtype, shape=output.shape)
        graph.nodes.append(gs.Node("Add", name=f"{fused.name}_residual", inputs=[product, residual], outputs=[summed]))
        product = summed
    graph.nodes.append(gs.Node(op, name=f"{fused.name}_{op.lower()}", attrs=attrs, inputs=[product, *extra],
                               outputs=[output]))
