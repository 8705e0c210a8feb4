"""Cost model: parameters and multiply-accumulates at the inferred (batch-1) shapes.

Weighted ops (Conv, ConvTranspose, Gemm, MatMul, ...) count what their op handler says; LSTM, GRU and
RNN count their multiply-accumulates; every other op that computes counts one per output element
(pooling: one per window element); ops that only move data (Reshape, Transpose, Concat, Slice, ...)
count nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..ops import handler_for
from ..shapes import infer_shapes

DATA_MOVEMENT = {
    "Reshape", "Flatten", "Transpose", "Concat", "Split", "Slice", "Squeeze", "Unsqueeze", "Identity",
    "Shape", "Gather", "Cast", "Dropout", "Expand", "Tile", "Pad", "Constant", "ConstantOfShape",
    "DepthToSpace", "SpaceToDepth", "Size", "Range", "GatherElements", "GatherND", "ScatterND",
}


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if dims is not None else 0


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple], inits: dict[str, tuple]) -> int:
    def shape(i, outputs=False):
        names = node.output if outputs else node.input
        if i >= len(names) or not names[i]:
            return None
        s = shapes.get(names[i])
        return None if s is None or any(d is None for d in s) else s

    out = shape(0, outputs=True)
    op = node.op_type
    handler = handler_for(op, node.domain)
    if handler is not None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        macs = handler.macs(op, attrs, shape(0), shape(1), out)
        if macs is not None:
            return macs + handler.optional_macs(op, tuple(bool(name) for name in node.input), out)
    if op in ("LSTM", "GRU", "RNN") and shape(0) and shape(1) and shape(2):
        steps = shape(0)[0]
        batch = shape(0)[1]
        return steps * batch * _prod(shape(1)) + steps * batch * _prod(shape(2))
    if op in DATA_MOVEMENT or out is None:
        return 0
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [1])
        return _prod(out) * _prod(kernel)
    if op.startswith("Global") or op.startswith("Reduce"):
        return _prod(shape(0))
    return _prod(out)


def model_cost(model: onnx.ModelProto, input_shapes: dict[str, list[int]], shapes: dict | None = None) -> dict:
    """{"params": int, "macs": int} at the given input shapes."""
    shapes = shapes if shapes is not None else infer_shapes(model, input_shapes)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    params = sum(_prod(dims) for dims in inits.values())
    macs = sum(node_macs(node, shapes, inits) for node in model.graph.node)
    return {"params": int(params), "macs": int(macs)}
