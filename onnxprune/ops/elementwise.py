"""Elementwise ops.

Unary ops (activations, Identity, Cast, Dropout, ...) carry their input's channels unchanged.
Broadcasting ops (Add, Mul, PRelu, Where, ...): the output carries the channels of its tracked operands,
which are joined when there are several (a residual Add, a squeeze-excite Mul); a constant operand that
spans the channel axis is sliced; one that broadcasts over it (size 1, or too low a rank) passes.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_graphsurgeon as gs

from .base import HIDDEN, MICROSOFT, Handler, handler_for, pass_through, register

RESIDUAL_OPS = ("Add", "Sum")

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
            if dim not in (None, 1) and not isinstance(tensor, gs.Constant):
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
                continue
            values = tensor.values
            offset = axis - (rank - values.ndim)
            if offset >= 0 and values.shape[offset] == len(mask):
                rw.set_input(node, i, np.compress(mask, values, axis=offset))


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
