"""Elementwise ops.

Unary ops (activations, Identity, Cast, Dropout, ...) carry their input's channels unchanged.
Broadcasting ops (Add, Mul, PRelu, Where, ...): the output carries the channels of its tracked operands,
which are joined when there are several (a residual Add, a squeeze-excite Mul); a constant operand that
spans the channel axis is sliced; one that broadcasts over it (size 1, or too low a rank) passes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import MICROSOFT, Handler, pass_through, register

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
                ctx.block_inputs(node, f"operand '{tensor.name}' spans the channels but is computed, not constant")
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
