"""A Reshape target computed from shapes, as torch writes every target of nn.MultiheadAttention once a dim is
dynamic, is rewritten into entries the handlers can follow: they follow channels only through a target
whose channel entries are constants or -1.

- An entry fixed at any input size (integer arithmetic on constants and on dims of computed tensors that
  ONNX's inference finds static: head_dim = E // heads with E read off the attention's input, the packed
  Q/K/V split [3, E], the out projection's width) becomes that constant. A dim of a graph input is left
  read (pruning never changes it), and so is a target with no dynamic entry (a static model's shape read,
  which the handlers see as it is).
- The entry of torch's ``q.view(S, B * heads, head_dim)`` that multiplies a dynamic size by the head count,
  checked at the analysed shapes to split the input's last axis into `heads` blocks of the (fixed)
  head_dim moved onto the axis before it, becomes -1: the count of kept heads is then inferred.

Exact: a fixed entry has its value at any size; -1 is inferred as the entry it replaces whenever the
original reshape succeeds, the target holding no other -1 (every other entry is a constant that is not
negative, or a size computed by arithmetic that keeps it non-negative) and `allowzero` being 0. As in
`inferred_merge`, an empty tensor differs: onnxruntime will not reshape it with a -1."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ._match import constant_values, onnx_op, static_shape, unused_name

log = logging.getLogger(__name__)

NAME = "computed_sizes"
TRIGGERS = {"Reshape", "Concat", "Shape"}  # ops a graph must all have for this rule to match
DYNAMIC = None  # an entry that is a non-negative size varying with the input sizes
PASS_ON = ("Unsqueeze", "Squeeze", "Cast", "Identity")  # a scalar entry's way to its Concat piece
MAX_DEPTH = 12  # how far back an entry's arithmetic is followed
MAX_ENTRIES = 64  # a larger integer constant is no shape
ARITHMETIC = ("Add", "Mul", "Div", "Sub", "Concat")  # ops whose every input is an entry
FOLLOWED = (*ARITHMETIC, *PASS_ON, "Gather", "Slice")  # the ops an entry is followed through (and Shape)


class NotFollowed(Exception):
    """An entry that may be negative, or computed by something other than integer shape arithmetic."""


def apply(graph: gs.Graph, shapes: dict | None = None) -> int:
    """Rewrite every computed Reshape target that has fixed entries or torch's B * heads; how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if onnx_op(node, "Reshape") and len(node.inputs) == 2 and node.outputs:
            pieces = _rewritten_pieces(node, graph, shapes or {})
            if pieces is not None:
                _set_target(graph, node, pieces)
                rewritten += 1
    return rewritten


def _rewritten_pieces(reshape: gs.Node, graph: gs.Graph, shapes: dict) -> list | None:
    """The pieces of the Concat computing `reshape`'s target, fixed ones as constants and B * heads as
    [-1]; None when nothing changes."""
    concat = reshape.inputs[1].inputs[0] if reshape.inputs[1].inputs else None
    if concat is None or not onnx_op(concat, "Concat") or int(concat.attrs.get("axis", 0)) not in (0, -1) \
            or int(reshape.attrs.get("allowzero", 0)) != 0:
        return None
    entries = [shape_entries(piece, graph, shapes) for piece in concat.inputs]
    if not any(e is not None and DYNAMIC in list(e.reshape(-1)) for e in entries):
        return None  # a target fixed at every size: a static model's, or one the handlers read as it is
    pieces = [_fixed(piece, e) for piece, e in zip(concat.inputs, entries)]
    heads = _batch_heads(reshape, concat.inputs, entries, shapes)
    if heads is not None:
        pieces[heads] = np.array([-1], dtype=np.int64)
    return pieces if any(isinstance(p, np.ndarray) for p in pieces) else None


def _fixed(piece: gs.Tensor, entries: np.ndarray | None):
    """A computed piece whose entries are all fixed as its values (int64), else the piece itself."""
    if entries is None or entries.ndim != 1 or not len(entries) or DYNAMIC in list(entries) \
            or constant_values(piece) is not None:
        return piece
    return np.array(list(entries), dtype=np.int64)


def _batch_heads(reshape: gs.Node, pieces: list, entries: list, shapes: dict) -> int | None:
    """The index of the piece holding torch's B * heads when `reshape` is ``[..., B, E] -> [..., B * heads,
    head_dim]`` (E = heads * head_dim at the analysed shapes, head_dim fixed, heads a fixed factor of that
    entry) and no other entry may be -1 at run time; else None."""
    if any(e is None or e.ndim != 1 for e in entries):
        return None
    flat = [v for e in entries for v in e]
    dims = [static_shape(t, shapes) for t in (reshape.inputs[0], reshape.outputs[0])]
    if None in dims or not len(dims[0]) == len(dims[1]) == len(flat) >= 2:
        return None
    if any(v is not DYNAMIC and v < 0 for v in flat) or flat[-1] is DYNAMIC or flat[-2] is not DYNAMIC:
        return None
    index = len(entries) - 2 if len(entries[-1]) == 1 else None
    heads = _head_factor(pieces[index]) if index is not None and len(entries[index]) == 1 else None
    (before, after), head_dim = dims, flat[-1]
    if heads is None or not (before[:-2] == after[:-2] and after[-2] == before[-2] * heads
                             and after[-1] == head_dim and before[-1] == heads * head_dim):
        log.debug("Reshape '%s': not [..., B, E] -> [..., B * heads, head_dim]: its computed size left", reshape.name)
        return None
    return index


def _head_factor(piece: gs.Tensor) -> int | None:
    """`heads` when `piece` is Mul(a non-negative size, heads) (maybe unsqueezed or cast), heads > 1 fixed."""
    node = piece.inputs[0] if piece.inputs else None
    while node is not None and onnx_op(node, *PASS_ON) and node.inputs[0].inputs:
        node = node.inputs[0].inputs[0]
    if node is None or not onnx_op(node, "Mul") or len(node.inputs) != 2:
        return None
    found = [shape_entries(t, None, {}) for t in node.inputs]
    if any(e is None or e.size != 1 for e in found):
        return None
    values = [e.reshape(-1)[0] for e in found]
    fixed = [v for v in values if v is not DYNAMIC]
    return int(fixed[0]) if len(fixed) == 1 and fixed[0] > 1 else None


def shape_entries(tensor: gs.Tensor, graph: gs.Graph | None, shapes: dict) -> np.ndarray | None:
    """`tensor`'s entries (`_entries`), None where it is not followed. Without `graph`, every shape dim is
    taken as DYNAMIC."""
    try:
        return _entries(tensor, {t.name for t in graph.inputs} if graph is not None else None, shapes, MAX_DEPTH)
    except (NotFollowed, ValueError, IndexError, KeyError, TypeError):  # a malformed shape computation too
        return None


def _entries(tensor: gs.Tensor, inputs: set | None, shapes: dict, depth: int) -> np.ndarray:
    """The values of integer shape arithmetic as an object array: an int where fixed at any input size,
    DYNAMIC where a non-negative size that may vary; NotFollowed otherwise. `inputs`: the names of the
    graph's inputs, whose dims count as DYNAMIC (None: every dim)."""
    values = constant_values(tensor)
    if values is not None:
        if values.dtype.kind not in "iu" or values.size > MAX_ENTRIES:
            raise NotFollowed
        return np.array(values.tolist(), dtype=object).reshape(values.shape)
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0 or not onnx_op(node, "Shape", *FOLLOWED):
        raise NotFollowed
    if node.op == "Shape":
        return _dims(node, inputs, shapes)
    args = [_entries(t, inputs, shapes, depth - 1) if i == 0 or node.op in ARITHMETIC else None
            for i, t in enumerate(node.inputs)]
    return _evaluated(node, args)


def _dims(shape: gs.Node, inputs: set | None, shapes: dict) -> np.ndarray:
    """Shape(t)'s entries: the dims ONNX's inference finds static (and the analysed shapes agree) for a
    computed tensor, DYNAMIC elsewhere."""
    source = shape.inputs[0]
    inferred, analysed = source.shape, shapes.get(source.name)
    rank = len(inferred) if inferred is not None else len(analysed) if analysed is not None else None
    if rank is None:
        raise NotFollowed
    start, end = (int(shape.attrs[k]) if k in shape.attrs else d for k, d in (("start", 0), ("end", rank)))
    dims = []
    for axis in range(rank)[start:end]:
        dim = inferred[axis] if inferred is not None else None
        fixed = inputs is not None and source.name not in inputs and isinstance(dim, int) and dim >= 0 \
            and (analysed is None or analysed[axis] == dim)
        dims.append(dim if fixed else DYNAMIC)
    return np.array(dims, dtype=object)


def _evaluated(node: gs.Node, args: list) -> np.ndarray:
    """`node` applied to entries `args` (the first input's, and every input's for ARITHMETIC)."""
    data = args[0]
    if node.op == "Identity":
        return data
    if node.op == "Cast":
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0))))
        if dtype.kind not in "iu" or dtype.itemsize < 4:  # 8 or 16 bits may wrap a size negative
            raise NotFollowed
        return data
    if node.op == "Concat":
        return np.concatenate(args, axis=int(node.attrs.get("axis", 0)))
    if node.op in ARITHMETIC:
        return np.asarray(np.frompyfunc(lambda a, b: _arithmetic(node.op, a, b), 2, 1)(*args), dtype=object)
    if node.op in ("Unsqueeze", "Squeeze"):
        return _reshaped(node, data)
    return _picked(node, data)  # Gather, Slice


def _arithmetic(op: str, a, b):
    """One entry of Add, Mul, Div or Sub; DYNAMIC when an operand is and the result stays non-negative."""
    if a is not DYNAMIC and b is not DYNAMIC:
        if op == "Div":
            if b == 0:
                raise NotFollowed
            return (-1 if (a < 0) != (b < 0) else 1) * (abs(a) // abs(b))  # ONNX truncates
        return {"Add": a + b, "Sub": a - b, "Mul": a * b}[op]
    if op == "Sub" or (op == "Div" and (b is DYNAMIC or b <= 0)):
        raise NotFollowed
    if any(v is not DYNAMIC and v < 0 for v in (a, b)):
        raise NotFollowed
    return DYNAMIC


def _constant_input(node: gs.Node, index: int) -> np.ndarray | None:
    return constant_values(node.inputs[index]) if len(node.inputs) > index and node.inputs[index].name else None


def _reshaped(node: gs.Node, data: np.ndarray) -> np.ndarray:
    axes = node.attrs.get("axes")
    if axes is None:
        axes = _constant_input(node, 1)
        if axes is None and (node.op == "Unsqueeze" or len(node.inputs) > 1):
            raise NotFollowed
    axes = None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    if node.op == "Squeeze":
        return np.squeeze(data, axis=None if axes is None else tuple(axes))
    rank = data.ndim + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        data = np.expand_dims(data, axis)
    return data


def _picked(node: gs.Node, data: np.ndarray) -> np.ndarray:
    """A Gather (axis 0, constant indices) or Slice (constant bounds on axis 0, step 1) of 1-D entries."""
    if data.ndim != 1:
        raise NotFollowed
    if node.op == "Gather":
        index = _constant_input(node, 1)
        if index is None or int(node.attrs.get("axis", 0)) != 0:
            raise NotFollowed
        return np.asarray(data[np.asarray(index, dtype=np.int64)], dtype=object)  # a scalar index picks one entry
    bounds = [_constant_input(node, i) for i in range(1, 5)]
    if any(b is None for b in bounds[:2]) or any(b is not None and b.size != 1 for b in bounds):
        raise NotFollowed
    axis, step = (int(b.reshape(())) if b is not None else d for b, d in zip(bounds[2:], (0, 1)))
    if axis not in (0, -1) or step != 1:
        raise NotFollowed
    return data[int(bounds[0].reshape(())):int(bounds[1].reshape(()))]


def _set_target(graph: gs.Graph, reshape: gs.Node, pieces: list) -> None:
    """`reshape` reads a new Concat of `pieces` (arrays made constants; the old Concat may have other readers)."""
    name = reshape.inputs[1].name
    inputs = [gs.Constant(unused_name(graph, f"{name}_entry{i}"), p) if isinstance(p, np.ndarray) else p
              for i, p in enumerate(pieces)]
    target = gs.Variable(unused_name(graph, f"{name}_sizes"), dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", name=target.name, attrs={"axis": 0}, inputs=inputs, outputs=[target]))
    reshape.inputs[1] = target
