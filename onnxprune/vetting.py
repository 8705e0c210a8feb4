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
from .io import mapped, tensor_array
from .ops import handler_for
from .runtime import available_memory


NAN_SLICE = 1 << 24  # elements checked for NaN at once
FLOATING = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


LAYOUT_DOMAINS = ("com.microsoft.nchwc", "com.ms.internal.nhwc")  # onnxruntime's channel layouts of one machine


def vet_model(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """Raise ModelError naming the first weight, node or tensor that makes the model unusable."""
    check_layout(model.graph)
    check_graph(model.graph)
    check_initializers(model)
    check_attributes(model, shapes)
    check_tensor_sizes(model, shapes)


def check_layout(graph: onnx.GraphProto) -> None:
    """No node of onnxruntime's hardware-specific channel layouts: a model saved after its optimizations at
    ORT_ENABLE_ALL holds its Conv filters in blocks of 8 or 16 channels (and fused activations in the Conv), which
    no channel cut can slice."""
    node = next((node for node in graph.node if node.domain in LAYOUT_DOMAINS), None)
    if node is not None:
        raise ModelError(f"{label(node)} is in onnxruntime's channel layout for this machine ({node.domain}): the model "
                         "was saved after onnxruntime's hardware-specific optimizations; prune the model as exported "
                         "(or as saved with graph_optimization_level ORT_ENABLE_EXTENDED or lower)")


def check_graph(graph: onnx.GraphProto) -> None:
    """Every tensor the nodes and graph outputs read is produced, once, by a node, a weight or a graph input,
    and the nodes form no cycle (subgraphs are left to onnxruntime)."""
    given = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer} | {i.name for i in graph.input}
    producer = {}
    for node in graph.node:
        for name in filter(None, node.output):
            if name in producer or name in given:
                other = label(producer[name]) if name in producer else "a weight or graph input"
                raise ModelError(f"tensor '{name}' is written by {label(node)} and by {other}: the model is broken; "
                                 "fix or re-export it")
            producer[name] = node
    readers = [(label(node), name) for node in graph.node for name in node.input] + \
        [(f"graph output '{o.name}'", o.name) for o in graph.output]
    for reader, name in readers:
        if name and name not in producer and name not in given:
            raise ModelError(f"{reader} reads '{name}', which no node, weight or graph input produces: the model is "
                             "broken; fix or re-export it")
    waiting = [len({name for name in node.input if name in producer}) for node in graph.node]
    consumers = {}
    for index, node in enumerate(graph.node):
        for name in {name for name in node.input if name in producer}:
            consumers.setdefault(name, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    for index in ready:  # grows while it is walked: Kahn's topological order
        for name in filter(None, graph.node[index].output):
            for consumer in consumers.get(name, []):
                waiting[consumer] -= 1
                if waiting[consumer] == 0:
                    ready.append(consumer)
    if len(ready) < len(graph.node):
        stuck = next(node for node, count in zip(graph.node, waiting) if count > 0)
        raise ModelError(f"{label(stuck)} is on a cycle (it reads, through other nodes, its own output): the model "
                         "is broken; fix or re-export it")


def check_initializers(model: onnx.ModelProto) -> None:
    """Every initializer holds the values its dims say, and no floating-point one holds NaN (Inf may be
    meant: attention masks use it)."""
    for tensor in model.graph.initializer:
        if mapped(tensor):  # its size was checked against the data file when it was mapped
            if tensor.data_type in FLOATING:
                check_no_nan(tensor.name, tensor_array(tensor))
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except Exception as exc:  # noqa: BLE001 - numpy and onnx raise several kinds on corrupt data
            dims = "x".join(str(d) for d in tensor.dims) or "a scalar"
            raise ModelError(f"weight '{tensor.name}' does not hold the values its dims ({dims}) say "
                             f"({type(exc).__name__}): the file is corrupt or was edited; re-export it") from None
        if tensor.data_type in FLOATING:
            check_no_nan(tensor.name, values)


def check_no_nan(name: str, values: np.ndarray) -> None:
    """A ModelError when `values` hold NaN; read in slices, so a mapped weight is not copied whole."""
    flat = values.reshape(-1)
    nans = sum(int(np.isnan(flat[start:start + NAN_SLICE]).sum()) for start in range(0, flat.size, NAN_SLICE))
    if nans:
        raise ModelError(f"weight '{name}' holds {nans} NaN values: the model is broken (a diverged training run "
                         "or a bad export); fix or re-export it")


def check_attributes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """What each node's handler finds wrong with its attributes at these shapes (`Handler.attribute_problem`)."""
    for node in model.graph.node:
        handler = handler_for(node.op_type, node.domain)
        if handler is None:
            continue
        attrs = attribute_values(node)
        problem = handler.attribute_problem(node.op_type, attrs, [shapes.get(i) for i in node.input],
                                            [shapes.get(o) for o in node.output])
        if problem:
            raise ModelError(f"{label(node)}: {problem}: fix or re-export the model")


def attribute_values(node: onnx.NodeProto) -> dict:
    """The node's attributes by name; one of no known type (bits flipped in the file) is a ModelError."""
    values = {}
    for attribute in node.attribute:
        try:
            values[attribute.name] = helper.get_attribute_value(attribute)
        except Exception:  # noqa: BLE001 - onnx raises several kinds on an unknown attribute type
            values[attribute.name] = None
        if values[attribute.name] is None:
            raise ModelError(f"{label(node)}: attribute '{attribute.name}' holds no value of a known type (the file "
                             "is corrupt or was edited): fix or re-export the model")
    return values


def label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"an unnamed {node.op_type}"


def check_tensor_sizes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> None:
    """No tensor a node computes may take more than half the memory available (at 4 bytes an element, as
    float32): onnxruntime holds it with the node's inputs, and the kernel would kill the process, or another."""
    memory = available_memory()
    if memory is None:
        return
    weights = {t.name for t in model.graph.initializer}
    inputs = [(name, "a model input") for name in (i.name for i in model.graph.input) if name not in weights]
    computed = [(name, f"computed by {label(node)}") for node in model.graph.node for name in node.output]
    for name, origin in inputs + computed:
        dims = shapes.get(name)
        if not name or dims is None or any(d is None for d in dims):
            continue
        size = 4 * float(np.prod(dims, dtype=np.float64))  # float: no int64 overflow on hostile dims
        if size > memory / 2:
            raise ModelError(
                f"tensor '{name}', {origin} ({'x'.join(str(d) for d in dims)}), would take "
                f"{size / 2**30:.3g} GB as float32, more than half the {memory / 2**30:.1f} GB of memory available: "
                "the model's input dims or the node's attributes (pads, sizes, shapes) are wrong, or --input-shape is too large")
