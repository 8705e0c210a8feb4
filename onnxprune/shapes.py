"""Static shapes of every tensor, for analysis and the cost model.

ONNX shape inference runs first, on a weightless skeleton (fast, and fine for models over 2 GB). What it
cannot resolve (shapes computed at run time, e.g. a Slice bounded by Shape() of an input) is then read
off one onnxruntime run at the same input shapes, with the unresolved tensors exposed as outputs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, shape_inference

from .errors import ModelError, first_line
from .io import skeleton

log = logging.getLogger(__name__)


def _static(value: onnx.ValueInfoProto):
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, tuple]:
    """Shape of every tensor (initializers, inputs, node outputs) at the given input shapes."""
    return complete_shapes(model, input_shapes, static_shapes(model, input_shapes))


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, tuple]:
    """The shapes ONNX shape inference gives (dims it cannot resolve are None), without onnxruntime."""
    try:
        inferred = shape_inference.infer_shapes(skeleton(model, input_shapes), data_prop=True)
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed on the model ({first_line(exc)}): "
                         "check --input-shape") from None
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shape = _static(value)
        if shape is not None:
            shapes[value.name] = shape
    for name, dims in input_shapes.items():
        shapes[name] = tuple(dims)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def complete_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]], shapes: dict[str, tuple]) -> dict[str, tuple]:
    """`shapes` with what ONNX inference left open read off one onnxruntime run (see the module docstring)."""
    shapes = dict(shapes)
    unknown = unknown_shapes(model, shapes)
    if unknown:
        shapes.update(_shapes_from_runtime(model, input_shapes, unknown))
    return shapes


def unknown_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> list[str]:
    """The node outputs whose shape `shapes` does not hold in full (what `complete_shapes` asks onnxruntime)."""
    return [o for node in model.graph.node for o in node.output if o and (shapes.get(o) is None or None in shapes[o])]


def _shapes_from_runtime(model, input_shapes, names) -> dict[str, tuple]:
    from .runtime import session, with_outputs  # onnxruntime only where ONNX inference falls short

    feeds = {}
    for value in model.graph.input:
        if value.name in input_shapes:
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = np.zeros(input_shapes[value.name], dtype=dtype)
    try:
        with with_outputs(model, names) as probe:
            sess = session(probe)
        values = sess.run(names, feeds)
    except Exception as exc:
        log.info("could not complete shapes with onnxruntime (%s); %d tensors stay unknown",
                 first_line(exc), len(names))
        return {}
    log.info("onnxruntime supplied the shapes of %d tensors ONNX inference left open", len(names))
    return {name: tuple(np.shape(v)) for name, v in zip(names, values)}
