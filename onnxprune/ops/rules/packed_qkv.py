"""A packed Q/K/V projection picked apart by layout ops and a Gather (torch's nn.MultiheadAttention, as in
torchvision's ViT: Reshape [S, B, 3E] -> [S, B, 3, E], Unsqueeze, Transpose, Squeeze, Gather(i) on the
packed axis) becomes the Slice it amounts to, `x[..., iE:(i+1)E]`: channels can be followed through a
Slice of the last axis, not through a Gather along the axis that holds them. Each match is checked by
running the chain on the positions of the packed tensor at the analysed shapes, once the chain is known
to keep the leading dims (batch, sequence) where they are at any size."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..layout import shape_slice
from ._match import constant_values, onnx_op, static_shape, unused_name

log = logging.getLogger(__name__)

NAME = "packed_qkv"
TRIGGERS = {"Gather", "Unsqueeze", "Squeeze"}  # ops a graph must all have for this rule to match
LAYOUT_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Transpose")
PATTERN = ("Reshape", "Unsqueeze", "Transpose", "Squeeze")  # then the Gather
MAX_POSITIONS = 1 << 24  # the positions of the packed tensor the check builds


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Rewrite every Gather that picks a slice of a packed tensor's last axis; how many. `shapes`: the
    analysed shapes (name -> dims), used where ONNX's inferred ones are not static."""
    rewritten = 0
    for node in list(graph.nodes):
        if onnx_op(node, "Gather") and node.outputs:
            found = _as_slice(node, shapes or {})
            if found is not None:
                _replace(graph, node, *found)
                rewritten += 1
    return rewritten


def _chain(gather: gs.Node, shapes: dict) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(the packed tensor, the layout ops from it to the Gather, in order) when they are torch's
    `unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)` with the leading dims kept whatever
    their sizes: the Reshape copies them (`_keeps_leading`), the Transpose only swaps the new axis 0 with
    the packed one and the Squeeze names its axis (the check in `_as_slice` runs at one size); else None."""
    chain, tensor = [], gather.inputs[0]
    while tensor.inputs and onnx_op(tensor.inputs[0], *LAYOUT_OPS) and len(chain) < len(PATTERN):
        chain.insert(0, tensor.inputs[0])
        tensor = tensor.inputs[0].inputs[0]
    if [n.op for n in chain] != list(PATTERN) or not _keeps_leading(chain[0], shapes):
        return None
    perm = chain[2].attrs.get("perm")
    moved = [axis for axis, p in enumerate(perm or []) if axis != p]
    squeeze = chain[3]
    named = "axes" in squeeze.attrs or (len(squeeze.inputs) > 1 and constant_values(squeeze.inputs[1]) is not None)
    return (tensor, chain) if len(moved) == 2 and moved[0] == 0 and named else None


def _keeps_leading(reshape: gs.Node, shapes: dict) -> bool:
    """The Reshape's target copies its input's leading dims at any size and splits the last in two: a
    constant target copying them (0) or naming them where inference found them static, or torch's
    Concat(Slice(Shape(input), 0, rank - 1), [k, E], an empty Slice of that shape)."""
    source = reshape.inputs[0]
    analysed = static_shape(source, shapes)
    if analysed is None:
        return False
    rank = len(analysed)
    target = constant_values(reshape.inputs[1])
    if target is not None:
        inferred = source.shape if source.shape is not None else [None] * rank
        return len(target) == rank + 1 and all(
            t == 0 or (isinstance(d, int) and t == d) for t, d in zip(target[:rank - 1], inferred))
    concat = reshape.inputs[1].inputs[0] if reshape.inputs[1].inputs else None
    if concat is None or concat.op != "Concat" or len(concat.inputs) < 2:
        return False
    head, tail, *rest = concat.inputs
    bounds = shape_slice(head, source, constant_values)
    split = constant_values(tail)
    return (bounds is not None and bounds[0] == 0 and bounds[1] in (rank - 1, -1) and split is not None
            and split.shape == (2,) and all((b := shape_slice(t, source, constant_values)) is not None
                                            and b[0] >= rank for t in rest))


def _as_slice(gather: gs.Node, shapes: dict) -> tuple[gs.Tensor, int, int] | None:
    """(packed tensor, start, end) when the Gather's output is the packed tensor's [..., start:end]."""
    found = _chain(gather, shapes)
    if found is None:
        return None
    packed, chain = found
    dims = [static_shape(t, shapes) for t in (packed, *(n.outputs[0] for n in chain), gather.outputs[0])]
    index = constant_values(gather.inputs[1])
    if index is None or index.ndim != 0 or any(d is None for d in dims):
        log.debug("Gather '%s' not a packed slice: shapes unknown, or an index array", gather.name)
        return None
    if not dims[0] or np.prod(dims[0]) > MAX_POSITIONS:
        log.debug("Gather '%s' not checked as a packed slice: its packed tensor is too large", gather.name)
        return None
    positions = np.arange(int(np.prod(dims[0]))).reshape(dims[0])
    picked = positions
    for node, shape in zip(chain, dims[1:-1]):
        if node.op == "Transpose":
            picked = np.transpose(picked, node.attrs["perm"])
        else:  # Reshape, Unsqueeze, Squeeze: a row-major reshape to the analysed shape
            picked = picked.reshape(shape)
        if list(picked.shape) != shape:
            return None
    picked = np.take(picked, int(index), axis=int(gather.attrs.get("axis", 0)))
    width = picked.shape[-1] if picked.ndim else 0
    if picked.ndim != positions.ndim or list(picked.shape[:-1]) != dims[0][:-1] or width == 0:
        return None
    start = int(picked.reshape(-1)[0] % dims[0][-1])
    if not np.array_equal(picked, positions[..., start:start + width]):
        log.debug("Gather '%s' after a reshape is not a slice of its packed tensor's last axis", gather.name)
        return None
    return packed, start, start + width


def _replace(graph: gs.Graph, gather: gs.Node, packed: gs.Tensor, start: int, end: int) -> None:
    output = gather.outputs[0]
    gather.inputs.clear()
    gather.outputs.clear()
    name = output.name
    bounds = [gs.Constant(unused_name(graph, f"{name}_{label}"), np.array([value], dtype=np.int64))
              for label, value in (("start", start), ("end", end), ("axis", -1))]
    graph.nodes.append(gs.Node("Slice", name=f"{name}_slice", inputs=[packed, *bounds], outputs=[output]))
