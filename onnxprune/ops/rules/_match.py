"""What the rules share: constants read as scalars or per-channel vectors, and single-reader chains."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..base import ONNX_DOMAINS, onnx_op  # noqa: F401 (onnx_op: the rules' import)


def scalar(tensor) -> float | None:
    """The value of a one-element constant, else None."""
    if isinstance(tensor, gs.Constant) and tensor.values.size == 1:
        return float(tensor.values.reshape(()))
    return None


def constant_values(tensor) -> np.ndarray | None:
    """The values of a constant, or of a Constant node's output; else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and onnx_op(producer, "Constant") and isinstance(producer.attrs.get("value"), gs.Constant):
        return producer.attrs["value"].values
    return None


def static_shape(tensor, shapes: dict) -> list[int] | None:
    """The tensor's dims when they are all known: as inferred, else at the analysed shapes `shapes`."""
    for shape in (tensor.shape, shapes.get(tensor.name)):
        if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape):
            return list(shape)
    return None


def unused_name(graph: gs.Graph, base: str) -> str:
    """`base`, or `base_2`, `base_3`, ... : a tensor name the graph does not have yet."""
    taken = graph.tensors()
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def channel_vector(tensor, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts against a [N, C, ...] tensor of `rank` as one value per channel (a
    scalar, or C values on axis 1 and ones elsewhere), as float64 of length C; else None."""
    if not isinstance(tensor, gs.Constant) or tensor.values.dtype.kind != "f" or tensor.values.ndim > rank:
        return None
    values = tensor.values
    if values.size == 1:
        return np.full(channels, float(values.reshape(())))
    shape = (1,) * (rank - values.ndim) + tuple(values.shape)
    if rank < 2 or shape[1] != channels or any(d != 1 for axis, d in enumerate(shape) if axis != 1):
        return None
    return values.reshape(channels).astype(np.float64)


def sole_reader(tensor: gs.Variable, graph: gs.Graph) -> gs.Node | None:
    """The one node reading `tensor`, when nothing else (no other node, no graph output) does and it is an
    ONNX op."""
    if len(tensor.outputs) != 1 or tensor in graph.outputs or tensor.outputs[0].domain not in ONNX_DOMAINS:
        return None
    return tensor.outputs[0]


def other_input(node: gs.Node, tensor) -> gs.Tensor | None:
    """The input of a two-input node that is not `tensor` (None when both are, or it has not two)."""
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0] if node.inputs[1] is tensor else None


def affine_step(op: str, scale: np.ndarray, shift: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of `x * scale + shift` after one more `op` (Mul, Div, Add, Sub) by `values`."""
    if op == "Mul":
        return scale * values, shift * values
    if op == "Div":
        return scale / values, shift / values
    return scale, shift + values if op == "Add" else shift - values


def float_tensor(tensor) -> bool:
    """A tensor whose element type is known to be floating point."""
    return tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f"


LINEAR = ("Mul", "Add", "Sub", "Div")  # the arithmetic the affine rules fold


def conv_weights(conv: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(filters, bias or None) of a Conv with constant floating-point weights, else None."""
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if not isinstance(weight, gs.Constant) or weight.values.dtype.kind != "f":
        return None
    if bias is not None and not isinstance(bias, gs.Constant):
        return None
    return weight.values, bias.values if bias is not None else None


def set_conv_weights(conv: gs.Node, filters: np.ndarray, bias: np.ndarray, label: str) -> None:
    """Give `conv` new constant filters and bias (float64 values, cast to the filters' type; never written
    into constants another node may share)."""
    dtype = conv.inputs[1].values.dtype
    conv.inputs[1] = gs.Constant(f"{label}_weight", filters.astype(dtype))
    folded_bias = gs.Constant(f"{label}_bias", bias.astype(dtype))
    if len(conv.inputs) > 2:
        conv.inputs[2] = folded_bias
    else:
        conv.inputs.append(folded_bias)


def finite(*arrays: np.ndarray) -> bool:
    return all(np.all(np.isfinite(a)) for a in arrays)
