"""Cost model: parameters and multiply-accumulates at the inferred (batch-1) shapes.

Conv, ConvTranspose, Gemm, MatMul, LSTM and GRU count their multiply-accumulates; every other op that
computes counts one per output element (pooling: one per window element); ops that only move data
(Reshape, Transpose, Concat, Slice, ...) count nothing.
"""

from __future__ import annotations

import numpy as np
import onnx

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
    if op == "Conv" and out and shape(1):
        w = shape(1)
        return _prod(out) * _prod(w[1:])
    if op == "ConvTranspose" and shape(0) and shape(1):
        w = shape(1)
        return _prod(shape(0)) * _prod(w[1:])
    if op in ("Gemm", "MatMul") and out and shape(0):
        a = shape(0)
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[0] if (op == "Gemm" and trans_a) else a[-1]
        return _prod(out) * k
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
