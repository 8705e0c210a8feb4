"""Slice bounds computed from shapes that are fixed at any input size become constants. torch writes
`w.split([E, 2 * E])` of nn.MultiheadAttention's packed `in_proj_weight`/`in_proj_bias` (cross-attention:
the query's projection apart from the memory's key and value) as Slices whose starts and ends add up E read
off the query's shape once an axis is dynamic; with constant bounds the slice of the weight folds into a
constant weight (folded here, as loading folds a static export's before the rules).

Starts, ends, axes and steps are followed as `computed_sizes` follows a Reshape target: integer arithmetic
on constants and on the dims ONNX's inference finds static for computed tensors. A bound that may vary with
the input sizes (a dim of a graph input, or of a tensor whose dim inference leaves symbolic) is left read.
Exact: a fixed bound has its value at any size."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ...io import fold_constants
from ._match import constant_values, onnx_op, unused_name
from .computed_sizes import DYNAMIC, shape_entries

log = logging.getLogger(__name__)

NAME = "computed_slices"
TRIGGERS = {"Slice", "Shape"}  # ops a graph must all have for this rule to match
BOUNDS = (1, 2, 3, 4)  # Slice's starts, ends, axes, steps


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Make every computed Slice bound that is fixed at any input size a constant; how many Slices changed."""
    rewritten = 0
    for node in list(graph.nodes):
        if onnx_op(node, "Slice") and node.outputs:
            fixed = _fixed_bounds(node, graph, shapes or {})
            for index, values in fixed.items():
                name = unused_name(graph, f"{node.inputs[index].name}_fixed")
                node.inputs[index] = gs.Constant(name, values)
            rewritten += bool(fixed)
    if rewritten:  # a weight sliced by constant bounds is a constant, as loading folds a static export's
        fold_constants(graph)
    return rewritten


def _fixed_bounds(node: gs.Node, graph: gs.Graph, shapes: dict) -> dict[int, np.ndarray]:
    """Input index -> constant values, for each computed bound of Slice `node` whose entries are all fixed."""
    fixed = {}
    for index in BOUNDS:
        bound = node.inputs[index] if len(node.inputs) > index else None
        if bound is None or not bound.name or constant_values(bound) is not None:
            continue
        entries = shape_entries(bound, graph, shapes)
        if entries is None or entries.ndim != 1 or DYNAMIC in list(entries):
            log.debug("Slice '%s': bound '%s' not fixed at every input size: left read", node.name, bound.name)
            continue
        fixed[index] = np.array(list(entries), dtype=_bound_dtype(node, bound))
    return fixed


def _bound_dtype(node: gs.Node, bound: gs.Tensor) -> np.dtype:
    """The integer type the Slice's bounds share (ONNX's Tind: int32 or int64); as `layout._index_type`, but
    a bound may also be a Constant node's output here."""
    for tensor in (bound, *node.inputs[1:]):
        values = constant_values(tensor)
        dtype = values.dtype if values is not None else tensor.dtype
        if dtype is not None and np.dtype(dtype) in (np.dtype(np.int32), np.dtype(np.int64)):
            return np.dtype(dtype)
    return np.dtype(np.int64)
