"""What the ONNX checker lets through but onnxruntime cannot survive, checked before any session of a
model we did not make: attributes each op handler knows to be unusable (`Handler.attribute_problem`:
a stride, kernel or group of 0, an empty window output) and tensors larger than the machine's memory
(from the inferred shapes). Then `runtime.first_run` creates the model's first session in a child process,
where a native crash becomes a one-line error."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError
from .ops import handler_for
from .runtime import available_memory


FLOATING = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def vet_model(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """Raise ModelError naming the first weight, node or tensor that makes the model unusable."""
    check_initializers(model)
    check_attributes(model, shapes)
    check_tensor_sizes(model, shapes)


def check_initializers(model: onnx.ModelProto) -> None:
    """Every initializer holds the values its dims say, and no floating-point one holds NaN (Inf may be
    meant: attention masks use it)."""
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except Exception as exc:  # noqa: BLE001 - numpy and onnx raise several kinds on corrupt data
            dims = "x".join(str(d) for d in tensor.dims) or "a scalar"
            raise ModelError(f"weight '{tensor.name}' does not hold the values its dims ({dims}) say "
                             f"({type(exc).__name__}): the file is corrupt or was edited; re-export it") from None
        if tensor.data_type in FLOATING and np.isnan(values).any():
            raise ModelError(f"weight '{tensor.name}' holds {int(np.isnan(values).sum())} NaN values: the model is "
                             "broken (a diverged training run or a bad export); fix or re-export it")


def check_attributes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """What each node's handler finds wrong with its attributes at these shapes (`Handler.attribute_problem`)."""
    for node in model.graph.node:
        handler = handler_for(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        problem = handler.attribute_problem(node.op_type, attrs, [shapes.get(i) for i in node.input],
                                            [shapes.get(o) for o in node.output])
        if problem:
            raise ModelError(f"{label(node)}: {problem}: fix or re-export the model")


def label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"an unnamed {node.op_type}"


def check_tensor_sizes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """No tensor a node computes may take more than half the memory available (at 4 bytes an element, as
    float32): onnxruntime holds it with the node's inputs, and the kernel would kill the process, or another."""
    memory = available_memory()
    if memory is None:
        return
    for node in model.graph.node:
        for name in node.output:
            dims = shapes.get(name)
            if not name or dims is None or any(d is None for d in dims):
                continue
            size = 4 * float(np.prod(dims, dtype=np.float64))  # float: no int64 overflow on hostile dims
            if size > memory / 2:
                raise ModelError(
                    f"tensor '{name}' computed by {label(node)} ({'x'.join(str(d) for d in dims)}) would take "
                    f"{size / 2**30:.3g} GB as float32, more than half the {memory / 2**30:.1f} GB of memory available: "
                    "the node's attributes (pads, sizes, shapes) are wrong, or --input-shape is too large")
