"""Einsum with a constant 2-D weight, spelled as a matrix product over the input's last axis.

`"...k,kn->...n"` (or with letters for the leading axes, `"bsk,kn->bsn"`) is a MatMul; `"...k,nk->...n"`
is one with the weight stored [outputs, features], as torch.nn.Linear keeps it. Like a MatMul, the
input's last axis is consumed by the weight and the output's last axis is a new source; channels
tracked on a leading axis pass through. Any other equation blocks the channels reaching it.
"""

from __future__ import annotations

import numpy as np

from .base import filters, register, text
from .linear import MatrixWeight


def weight_in_axis(equation) -> int | None:
    """The weight's feature axis (0: [k, n], 1: [n, k]) when `equation` is a matrix product of the
    first operand's last axis with a 2-D second operand, else None."""
    spelled = text(equation or "").replace(" ", "")
    inputs, arrow, output = spelled.partition("->")
    operands = inputs.split(",")
    if not arrow or len(operands) != 2 or len(operands[1]) != 2 or not operands[0]:
        return None
    x, weight = operands
    lead, k = x[:-1], x[-1]
    letters = lead.removeprefix("...")
    if k not in weight or "." in letters + k + weight or len(set(letters + weight)) != len(letters) + 2:
        return None  # repeated letters (diagonals, contractions of leading axes) are not a matrix product
    in_axis = weight.index(k)
    return in_axis if output == lead + weight[1 - in_axis] else None


@register("Einsum")
class EinsumHandler(MatrixWeight):
    def weight_layout(self, op, attrs, weight_shape):
        in_axis = weight_in_axis(attrs.get("equation"))
        return None if in_axis is None else self.matrix_layout(op, weight_shape, in_axis)

    def _layout(self, node):
        found = self.constant_weight(node)
        return None if found is None else found[1]

    def propagate(self, node, ctx):
        layout = self._layout(node) if len(node.inputs) == 2 else None
        if layout is None:
            ctx.block_inputs(node, "not a matrix product with a constant 2-D second operand")
            return
        ctx.block_unexpected(node, channel_inputs=(0,))
        x, shape = ctx.channels(node.inputs[0]), ctx.shape(node.inputs[0])
        if shape is None:
            if x is not None:
                ctx.block(x.ids, f"Einsum '{node.name}': input shape unknown")
            return
        last = len(shape) - 1
        if x is not None and x.axis != last:
            ctx.set(node.outputs[0], x)  # channels on a leading axis pass through
            return
        ctx.new_source(node, node.outputs[0], layout.out_channels, axis=last)

    def rewrite(self, node, rw):
        if not rw.is_source(node):
            return  # channels passed through on a leading axis: nothing to slice
        layout, weight = self._layout(node), node.inputs[1].values
        in_mask, out_mask = rw.mask(node.inputs[0]), rw.mask(node.outputs[0])
        if in_mask is not None:
            weight = np.compress(in_mask, weight, axis=layout.in_axis)
        if out_mask is not None:
            weight = np.compress(out_mask, weight, axis=layout.out_axis)
        rw.set_input(node, 1, weight)

    def filter_weights(self, node):
        return filters(self, self._layout(node), node.inputs[1].values)

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        if weight_in_axis(attrs.get("equation")) is None:
            return None  # another contraction: the cost model's default
        return super().macs(op, attrs, in_shape, weight_shape, out_shape)
