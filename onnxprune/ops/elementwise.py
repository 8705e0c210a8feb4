"""Elementwise ops.

Unary ops (activations, Identity, Cast, Dropout, ...) carry their input's channels unchanged.
Broadcasting ops (Add, Mul, PRelu, Where, ...): the output carries the channels of its tracked operands,
which are joined when there are several (a residual Add, a squeeze-excite Mul); a constant operand that
spans the channel axis is sliced; one that broadcasts over it (size 1, or too low a rank) passes, and so
does a computed one expanded over it (a padding mask over the attention heads), gathered at the kept channels.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_graphsurgeon as gs

from .base import HIDDEN, MICROSOFT, Handler, gather_kept, handler_for, onnx_op, pass_through, register

RESIDUAL_OPS = ("Add", "Sum")
COPYING = ("Expand", "Reshape")  # the ops of an operand `copied_over` the channel axis
MAX_COPY_CHAIN = 4
MAX_POSITIONS = 1 << 22  # the positions `copied_over` builds

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softplus",
    "Softsign", "Elu", "Selu", "Celu", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
    "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Identity", "Cast", "CastLike",
    "Dropout", "Shrink", "BitwiseNot",
)
NOT_FLOAT = ("Not", "IsNaN", "IsInf", "Cast", "CastLike", "BitwiseNot")  # their output is not their input's type


@register(*UNARY)
class UnaryHandler(Handler):
    def propagate(self, node, ctx):
        channel_inputs = (0, 1) if node.op == "CastLike" else (0,)
        ctx.block_unexpected(node, channel_inputs=channel_inputs)
        outputs = (0, 1) if node.op == "Dropout" else (0,)  # Dropout's mask has the data's shape
        pass_through(node, ctx, outputs=outputs)

    def per_channel(self, node):
        return node.op not in NOT_FLOAT


@register("Gelu")
class GeluHandler(UnaryHandler):
    domains = (MICROSOFT,)  # onnxruntime's Gelu too (onnxruntime.transformers' optimizer writes it)


@register("Clip")
class ClipHandler(Handler):
    """Clip's min and max are scalars, so channels pass through."""

    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        pass_through(node, ctx)

    def per_channel(self, node):
        return True


BROADCAST = (
    "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where", "Equal",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
)
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean")  # the rest: not floats out


@register(*BROADCAST)
class BroadcastHandler(Handler):
    def propagate(self, node, ctx):
        out_shape = ctx.shape(node.outputs[0])
        tracked = [(i, ctx.channels(t)) for i, t in enumerate(node.inputs) if ctx.channels(t) is not None]
        if not tracked:
            return
        if out_shape is None:
            ctx.block_inputs(node, "output shape unknown")
            return
        rank = len(out_shape)
        aligned = {}
        for i, cmap in tracked:
            in_shape = ctx.shape(node.inputs[i])
            if in_shape is None:
                ctx.block_inputs(node, "input shape unknown")
                return
            aligned[i] = cmap.axis + rank - len(in_shape)
        axes = set(aligned.values())
        if len(axes) > 1:
            ctx.block_inputs(node, "operands carry channels on different axes")
            return
        axis = axes.pop()
        first = tracked[0][1]
        for _, cmap in tracked[1:]:
            if len(cmap.ids) != len(first.ids):
                ctx.block_inputs(node, "operands carry different channel counts")
                return
            ctx.join(first.ids, cmap.ids)
        for i, tensor in enumerate(node.inputs):
            if i in aligned:
                continue
            dim = _dim_at(ctx.shape(tensor), axis, rank)
            if dim is None and not isinstance(tensor, gs.Constant) and ctx.shape(tensor) is None:
                ctx.block_inputs(node, f"operand '{tensor.name}' has an unknown shape")
                return
            if dim not in (None, 1) and not isinstance(tensor, gs.Constant) \
                    and not copied_over(tensor, axis - rank + len(ctx.shape(tensor)), len(first.ids), ctx):
                hint = hidden_hint(tensor, dim, ctx) if node.op in RESIDUAL_OPS else ""
                ctx.block_inputs(node, f"operand '{tensor.name}' spans the channels but is computed, not constant"
                                       + hint)
                return
        ctx.set(node.outputs[0], type(first)(axis, first.ids))

    def per_channel(self, node):
        return node.op in ARITHMETIC

    def rewrite(self, node, rw):
        mask = rw.mask(node.outputs[0])
        if mask is None:
            return
        rank = rw.rank(node.outputs[0])
        axis = rw.tracked_axis(node.outputs[0])
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                _gather_copies(node, i, axis - rank, mask, rw)
                continue
            values = tensor.values
            offset = axis - (rank - values.ndim)
            if offset >= 0 and values.shape[offset] == len(mask):
                rw.set_input(node, i, np.compress(mask, values, axis=offset))


def _gather_copies(node: gs.Node, index: int, axis: int, mask: np.ndarray, rw) -> None:
    """A computed operand admitted by `copied_over` (untracked, as wide as the channels at `axis`, counted
    from the end) reads only the kept positions of that axis: a Gather of them, exact at any size."""
    tensor = node.inputs[index]
    if rw.is_tracked(tensor):
        return
    shape = rw.analysis.shapes.get(tensor.name)
    if shape is None or len(shape) < -axis or shape[axis] != len(mask) or len(mask) < 2:
        return
    gather_kept(node, index, len(shape) + axis, mask, rw)


def copied_over(tensor: gs.Tensor, axis: int, count: int, ctx) -> bool:
    """A computed operand (`axis` its axis aligned with `count` channels) that holds the same values at every
    position of that axis: torch's padding mask expanded over the heads (`mask.view(B, 1, 1, S).expand(-1,
    heads, -1, -1).reshape(B * heads, 1, S)`, viewed back as [B, heads, -1, S]), an Expand from size 1 then
    only Reshapes, checked on positions at the analysed shapes; and its size there is `count` at any input
    size (the last node names it as a constant). Such an operand passes: the rewrite gathers the kept
    positions, which is exact whatever its values (`_gather_copies`); the check only says what it is."""
    chain, current = [], tensor
    while current.inputs and onnx_op(current.inputs[0], *COPYING) and len(chain) < MAX_COPY_CHAIN:
        chain.insert(0, current.inputs[0])
        if current.inputs[0].op == "Expand":
            break
        current = current.inputs[0].inputs[0]
    if not chain or chain[0].op != "Expand" or _fixed_entry(chain[-1], axis, ctx) != count:
        return False
    shapes = [ctx.shape(t) for t in (chain[0].inputs[0], *(n.outputs[0] for n in chain))]
    if any(s is None for s in shapes) or int(np.prod(shapes[1], dtype=np.int64)) > MAX_POSITIONS:
        return False
    try:
        positions = np.broadcast_to(np.arange(int(np.prod(shapes[0], dtype=np.int64))).reshape(shapes[0]), shapes[1])
        for shape in shapes[2:]:
            positions = positions.reshape(shape)
    except ValueError:  # shapes that do not chain
        return False
    return positions.shape[axis] == count and bool((positions == positions.take([0], axis=axis)).all())


def _fixed_entry(node: gs.Node, axis: int, ctx) -> int | None:
    """The size of `node`'s output at `axis` (non-negative) where its target names it as a positive
    constant, so at any input size: a Reshape's (allowzero 0) or an Expand's shape, a constant or a Concat of
    pieces (at their analysed lengths); else None."""
    if len(node.inputs) != 2 or int(node.attrs.get("allowzero", 0)):
        return None
    target, rank = node.inputs[1], len(ctx.shape(node.outputs[0]) or ())
    concat = target.inputs[0] if target.inputs and onnx_op(target.inputs[0], "Concat") else None
    pieces = concat.inputs if concat is not None and int(concat.attrs.get("axis", 0)) in (0, -1) else [target]
    lengths = [ctx.shape(p)[0] if ctx.shape(p) is not None and len(ctx.shape(p)) == 1 else None for p in pieces]
    if None in lengths:
        return None
    position = axis - rank + sum(lengths)  # an Expand's shape aligns with the output's last axes
    for piece, length in zip(pieces, lengths):
        if 0 <= position < length:
            values = ctx.const(piece)
            entry = int(values.reshape(-1)[position]) if values is not None else 0
            return entry if entry > 0 else None
        position -= length
    return None


def _dim_at(shape, axis: int, rank: int):
    """Size of `shape` at output axis `axis` after right-aligned broadcasting (None: not covered)."""
    if shape is None:
        return None
    offset = axis - (rank - len(shape))
    return shape[offset] if offset >= 0 else None


def hidden_hint(tensor: gs.Tensor, width: int | None, ctx) -> str:
    """For a residual operand `width` channels wide that no tracked channels reach: ' (...)' suggesting
    --hidden when a node it changes is above the operand (a norm over that many features it lets the stream
    through, an embedding it makes its source); else ''."""
    norm = None if ctx.allows(HIDDEN) or width is None else _hidden_norm_above(tensor, width, ctx)
    return "" if norm is None else \
        f" (a residual stream out of {norm.op} '{norm.name}': try --hidden, which prunes the stream's width)"


def _hidden_norm_above(tensor: gs.Tensor, width: int, ctx, budget: int = 1024):
    """The nearest node above `tensor`, through tensors carrying no tracked channels (at most `budget` of
    them), that the hidden-size option lets a residual width of `width` through or makes its source; None
    when none is."""
    queue, seen = deque([tensor]), set()
    while queue and len(seen) < budget:
        current = queue.popleft()
        if current.name in seen or not current.inputs:
            continue
        seen.add(current.name)
        producer = current.inputs[0]
        if _passes_hidden(producer, width, ctx):
            return producer
        queue.extend(t for t in producer.inputs if isinstance(t, gs.Variable) and ctx.channels(t) is None)
    return None


def _passes_hidden(node: gs.Node, width: int, ctx) -> bool:
    """The hidden-size option lets a residual width of `width` through `node` or makes it its source."""
    handler = handler_for(node.op, node.domain)
    return handler is not None and handler.hidden_width(node, ctx) == width
