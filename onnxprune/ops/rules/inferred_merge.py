"""A Reshape that merges its input's trailing axes into its last one, with that last size computed from
another tensor's shape (torchvision's Swin merges attention heads back with
``x.reshape(B, N, C)``, C read off the block's input, the hidden size), gets -1 there instead: the size
is inferred from the tensor itself. The analysis can follow channels only through a target whose
channel entry is a constant, and a pruned tensor has fewer channels than the hidden size says.

Exact: a target with no other -1 names every other size, so -1 is inferred as the size the original
named whenever the original reshape succeeds; each other entry must be a non-negative constant or
computed from shapes by arithmetic that keeps it non-negative (so no second -1 at run time), and
`allowzero` must be 0. One case differs: an empty tensor (a size 0 among the other entries), which
onnxruntime refuses to reshape with a -1 where the original returned it empty."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ._match import constant_values, onnx_op, static_shape, unused_name

log = logging.getLogger(__name__)

NAME = "inferred_merge"
TRIGGERS = {"Reshape", "Concat", "Shape"}  # ops a graph must all have for this rule to match
SHAPE_COPIES = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape")  # entries of input 0
MAX_DEPTH = 12  # how far back a piece's arithmetic is followed


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Give every merging Reshape whose last size is computed -1 there; how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if onnx_op(node, "Reshape") and len(node.inputs) == 2 and node.outputs:
            pieces = _merge_pieces(node, shapes or {})
            if pieces is not None:
                _infer_last(graph, node, pieces)
                rewritten += 1
    return rewritten


def _merge_pieces(reshape: gs.Node, shapes: dict) -> list[gs.Tensor] | None:
    """The pieces of the Concat that computes `reshape`'s target when it merges the trailing input axes
    into the last output axis (at the analysed shapes), the last piece is one computed entry and every
    other piece is non-negative at any size; else None."""
    if int(reshape.attrs.get("allowzero", 0)) != 0:
        return None
    target = reshape.inputs[1]
    concat = target.inputs[0] if target.inputs else None
    if concat is None or not onnx_op(concat, "Concat") or int(concat.attrs.get("axis", 0)) not in (0, -1):
        return None
    dims = [static_shape(t, shapes) for t in (reshape.inputs[0], reshape.outputs[0])]
    if None in dims or not _merges_trailing(*dims):
        return None
    pieces = list(concat.inputs)
    last = pieces[-1]
    if constant_values(last) is not None or static_shape(last, shapes) != [1]:
        return None  # a constant entry the analysis reads as it is, or not one entry
    lengths = [_length(p, shapes) for p in pieces]
    if None in lengths or sum(lengths) != len(dims[1]):
        return None
    if not all(_nonnegative(p, MAX_DEPTH) for p in pieces[:-1]):
        log.debug("Reshape '%s': an entry of its target may be -1 at run time: its merged size left", reshape.name)
        return None
    return pieces


def _merges_trailing(in_dims: list[int], out_dims: list[int]) -> bool:
    """The output keeps the input's leading axes and merges the rest (two or more) into its last axis."""
    k = len(out_dims)
    return 1 <= k < len(in_dims) and out_dims[:-1] == in_dims[:k - 1] and out_dims[-1] == int(np.prod(in_dims[k - 1:]))


def _length(piece: gs.Tensor, shapes: dict) -> int | None:
    values = constant_values(piece)
    if values is not None:
        return int(values.size) if values.ndim == 1 else None
    found = static_shape(piece, shapes)
    return found[0] if found is not None and len(found) == 1 else None


def _nonnegative(tensor: gs.Tensor, depth: int) -> bool:
    """Whether `tensor` holds no negative value at any input size: a non-negative integer constant, a
    Shape, the entries of one, or sums, products and quotients (by positive constants) of those."""
    values = constant_values(tensor)
    if values is not None:
        return values.dtype.kind in "iu" and bool(np.all(values >= 0))
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or depth == 0 or not onnx_op(producer, "Shape", "Concat", "Mul", "Add", "Div", *SHAPE_COPIES):
        return False
    if producer.op == "Shape":
        return True
    if producer.op == "Cast" and np.dtype(helper.tensor_dtype_to_np_dtype(int(producer.attrs.get("to", 0)))).itemsize < 4:
        return False  # a Cast to 8 or 16 bits may wrap a size to a negative one (32 bits would need 2^31 of one dim)
    if producer.op in SHAPE_COPIES:
        return _nonnegative(producer.inputs[0], depth - 1)
    if producer.op == "Div":
        divisor = constant_values(producer.inputs[1])
        return divisor is not None and bool(np.all(divisor > 0)) and _nonnegative(producer.inputs[0], depth - 1)
    return all(_nonnegative(t, depth - 1) for t in producer.inputs)  # Concat, Mul, Add


def _infer_last(graph: gs.Graph, reshape: gs.Node, pieces: list[gs.Tensor]) -> None:
    """`reshape` reads a new Concat of `pieces` with -1 last (the old Concat may have other readers)."""
    name = reshape.inputs[1].name
    inferred = gs.Constant(unused_name(graph, f"{name}_inferred"), np.array([-1], dtype=np.int64))
    target = gs.Variable(unused_name(graph, f"{name}_merge"), dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", name=target.name, attrs={"axis": 0}, inputs=[*pieces[:-1], inferred],
                               outputs=[target]))
    reshape.inputs[1] = target
