"""The weight-layout contract every weighted op handler keeps, checked against onnxruntime.

For one node of a model: the handler's input rows times its weight matrix (times the op's scale, plus
the bias) are the op's output rows; the matrix goes back to the weight unchanged; its features are
ordered input channel first (scaling input channel c scales exactly the features of c).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.ops.base import scale_inputs, weighted, zero_inputs
from tests.builders import random_input, run


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _values(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    found = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(found[0]) if found else None


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def check_weight_layout(model: onnx.ModelProto, node_name: str, seed: int = 0) -> None:
    node = _node(model, node_name)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = _values(model, node.input[1])
    handler, layout = weighted(node.op_type, attrs, weight.shape)
    x, y = run(_with_outputs(model, [node.input[0], node.output[0]]), random_input(model, seed))

    matrix = handler.to_matrix(layout, weight)
    assert matrix.shape == (layout.groups, layout.features, layout.out_channels // layout.groups)
    np.testing.assert_array_equal(handler.from_matrix(layout, matrix), weight)

    rows = np.arange(handler.rows(layout, y.shape))
    features = handler.input_rows(layout, attrs, x, y.shape, rows).astype(np.float64)
    predicted = np.einsum("rgf,gfo->rgo", features, matrix * layout.scale).reshape(len(rows), -1)
    bias = _values(model, node.input[layout.bias_input]) if layout.bias_input is not None and \
        len(node.input) > layout.bias_input else None
    if bias is not None:
        predicted += bias.reshape(-1) * layout.bias_scale
    every_row = handler.output_rows(layout, y, slice(None))
    np.testing.assert_allclose(predicted, every_row, rtol=1e-4, atol=1e-4)
    some = np.random.default_rng(seed).permutation(len(rows))[: max(1, len(rows) // 3)]
    np.testing.assert_array_equal(handler.output_rows(layout, y, some), every_row[some])
    assert handler.positions(layout, y.shape) * y.shape[0] == len(rows)

    factors = np.random.default_rng(seed).uniform(0.5, 2.0, layout.in_channels)
    per_feature = np.repeat(factors.reshape(layout.groups, -1), layout.kernel_size, axis=1)[..., None]
    scaled = handler.to_matrix(layout, scale_inputs(handler, layout, weight, factors))
    np.testing.assert_allclose(scaled, (matrix * per_feature).astype(weight.dtype), rtol=1e-6)
    keep = np.arange(layout.in_channels) % 2 == 0
    zeroed = handler.to_matrix(layout, zero_inputs(handler, layout, weight, keep))
    np.testing.assert_array_equal(zeroed, np.where(np.repeat(keep.reshape(layout.groups, -1), layout.kernel_size,
                                                             axis=1)[..., None], matrix, 0))
