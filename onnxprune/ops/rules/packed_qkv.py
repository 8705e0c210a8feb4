"""A packed Q/K/V projection picked apart by layout ops and a Gather (torch's nn.MultiheadAttention, as in
torchvision's ViT: Reshape [S, B, 3E] -> [S, B, 3, E], Unsqueeze, Transpose, Squeeze, Gather(i) on the
packed axis) becomes the Slice it amounts to, `x[..., iE:(i+1)E]`: channels can be followed through a
Slice of the last axis, not through a Gather along the axis that holds them. Each match is checked by
running the chain on the positions of the packed tensor at the analysed shapes."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ._match import constant_values, onnx_op

log = logging.getLogger(__name__)

NAME = "packed_qkv"
TRIGGERS = {"Gather", "Unsqueeze", "Squeeze"}  # ops a graph must all have for this rule to match
LAYOUT_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Transpose")
PATTERN = ("Reshape", "Unsqueeze", "Transpose", "Squeeze")  # then the Gather
MAX_POSITIONS = 1 << 24  # the positions of the packed tensor the check builds


def apply(graph: gs.Graph) -> int:
    """Rewrite every Gather that picks a slice of a packed tensor's last axis; how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if onnx_op(node, "Gather") and node.outputs:
            found = _as_slice(node)
            if found is not None:
                _replace(graph, node, *found)
                rewritten += 1
    return rewritten


def _static(tensor) -> list[int] | None:
    shape = tensor.shape
    return list(shape) if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape) else None


def _chain(gather: gs.Node) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(the packed tensor, the layout ops from it to the Gather, in order) when they are torch's
    `unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)`: the Transpose only swaps the new
    axis 0 with the packed one, so the leading dims stay where they are whatever their sizes (the check
    in `_as_slice` runs at one size); else None."""
    chain, tensor = [], gather.inputs[0]
    while tensor.inputs and onnx_op(tensor.inputs[0], *LAYOUT_OPS) and len(chain) < len(PATTERN):
        chain.insert(0, tensor.inputs[0])
        tensor = tensor.inputs[0].inputs[0]
    if [n.op for n in chain] != list(PATTERN):
        return None
    perm = chain[2].attrs.get("perm")
    moved = [axis for axis, p in enumerate(perm or []) if axis != p]
    return (tensor, chain) if len(moved) == 2 and moved[0] == 0 else None


def _as_slice(gather: gs.Node) -> tuple[gs.Tensor, int, int] | None:
    """(packed tensor, start, end) when the Gather's output is the packed tensor's [..., start:end]."""
    found = _chain(gather)
    if found is None:
        return None
    packed, chain = found
    shapes = [_static(t) for t in (packed, *(n.outputs[0] for n in chain), gather.outputs[0])]
    index = constant_values(gather.inputs[1])
    if index is None or any(s is None for s in shapes) or index.ndim != 0 or not shapes[0] or np.prod(shapes[0]) > MAX_POSITIONS:
        log.debug("Gather '%s' not a packed slice: shapes unknown or dynamic, or an index array", gather.name)
        return None
    positions = np.arange(int(np.prod(shapes[0]))).reshape(shapes[0])
    picked = positions
    for node, shape in zip(chain, shapes[1:-1]):
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            picked = np.transpose(picked, perm) if perm is not None else picked.T
        else:  # Reshape, Unsqueeze, Squeeze: a row-major reshape to the inferred shape
            picked = picked.reshape(shape)
        if list(picked.shape) != shape:
            return None
    picked = np.take(picked, int(index), axis=int(gather.attrs.get("axis", 0)))
    width = picked.shape[-1] if picked.ndim else 0
    if picked.ndim != positions.ndim or list(picked.shape[:-1]) != shapes[0][:-1] or width == 0:
        return None
    start = int(picked.reshape(-1)[0] % shapes[0][-1])
    if not np.array_equal(picked, positions[..., start:start + width]):
        log.debug("Gather '%s' after a reshape is not a slice of its packed tensor's last axis", gather.name)
        return None
    return packed, start, start + width


def _replace(graph: gs.Graph, gather: gs.Node, packed: gs.Tensor, start: int, end: int) -> None:
    output = gather.outputs[0]
    gather.inputs.clear()
    gather.outputs.clear()
    name = output.name
    bounds = [gs.Constant(f"{name}_{label}", np.array([value], dtype=np.int64))
              for label, value in (("start", start), ("end", end), ("axis", -1))]
    graph.nodes.append(gs.Node("Slice", name=f"{name}_slice", inputs=[packed, *bounds], outputs=[output]))
