"""Gemm and MatMul with a constant weight: input features are consumed, output features are a source.

MatMul `A[..., K] @ W[K, N]`: channels tracked on the last axis of A are consumed by W's rows; channels
tracked on any other axis of A pass through (the product acts on the last axis only). A MatMul of two
computed tensors (attention's scores and context) has no weight: channels on a batch axis (attention
heads) pass, joined when both operands carry them, as do A's rows and B's columns; channels on the
contracted axis are blocked.

Weight layout: a 2-D matrix, [input features, outputs] (Gemm with transB: [outputs, input features]);
Gemm scales it by alpha. One output row per row of A (Gemm) or per position of A's leading axes (MatMul).
"""

from __future__ import annotations

import numpy as np

from .base import Handler, WeightLayout, attr, const_input, has_input, register, weight_axis_ids


class MatrixWeight(Handler):
    """The weight layout of ops that multiply their input's feature axis by a 2-D weight: [features,
    outputs] (in_axis 0) or [outputs, features] (in_axis 1)."""

    @staticmethod
    def matrix_layout(op, weight_shape, in_axis: int, data_axis: int = -1, **extra) -> WeightLayout | None:
        if len(weight_shape) != 2:
            return None
        return WeightLayout(op, weight_shape, weight_shape[in_axis], weight_shape[1 - in_axis], in_axis, 1 - in_axis,
                            data_axis=data_axis, **extra)

    def features_axis(self, attrs: dict) -> int:
        """The input's axis that the weight contracts."""
        return -1

    def weight_channels(self, node, ctx):
        """Channels on the input's feature axis slice the weight's input axis, those on the output's last
        axis its output axis (a MatMul passing channels on along a row axis slices neither)."""
        found = self.constant_weight(node)
        if found is None:
            return None
        weight, layout = found
        shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        if shape is None or out_shape is None:
            return weight, {layout.in_axis: None, layout.out_axis: None}
        x, y = ctx.channels(node.inputs[0]), ctx.channels(node.outputs[0])
        in_ids = weight_axis_ids(x, self.features_axis(node.attrs) % len(shape), weight.shape[layout.in_axis])
        out_ids = weight_axis_ids(y, len(out_shape) - 1, weight.shape[layout.out_axis])
        return weight, {layout.in_axis: in_ids, layout.out_axis: out_ids}

    def to_matrix(self, layout, weight):
        return (weight.T if layout.in_axis == 1 else weight)[None]

    def from_matrix(self, layout, matrix):
        return matrix[0].T if layout.in_axis == 1 else matrix[0]

    def input_factors(self, layout, factors):
        return factors[None, :] if layout.in_axis == 1 else factors[:, None]

    def rows(self, layout, out_shape):
        return int(np.prod(out_shape[:-1], dtype=np.int64))

    def positions(self, layout, out_shape):
        return int(np.prod(out_shape[1:-1], dtype=np.int64))

    def output_rows(self, layout, y, rows):
        return y.reshape(-1, y.shape[-1])[rows]

    def input_rows(self, layout, attrs, x, out_shape, rows):
        if layout.data_axis == 0:  # Gemm with transA: features are the rows of A
            x = x.T
        return x.reshape(-1, x.shape[-1])[rows][:, None, :]

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        if not (out_shape and in_shape):
            return None
        return int(np.prod(out_shape, dtype=np.int64)) * in_shape[self.features_axis(attrs)]


@register("Gemm")
class GemmHandler(MatrixWeight):
    def weight_layout(self, op, attrs, weight_shape):
        return self.matrix_layout(op, weight_shape, 1 if attrs.get("transB", 0) else 0, self.features_axis(attrs),
                                  scale=attrs.get("alpha", 1.0), bias_input=2, bias_scale=attrs.get("beta", 1.0))

    def features_axis(self, attrs):
        return 0 if attrs.get("transA", 0) else 1

    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        weight = const_input(node, 1)
        bias_ok = not has_input(node, 2) or const_input(node, 2) is not None
        x = ctx.channels(node.inputs[0])
        if weight is None or not bias_ok:
            if x is not None:
                ctx.block(x.ids, f"Gemm '{node.name}': weight or bias is not a constant")
            return
        feature_axis = self.features_axis(node.attrs)
        if x is not None and x.axis != feature_axis:
            ctx.block(x.ids, f"Gemm '{node.name}': channels arrive on the row axis of A")
        n_out = weight.shape[0] if attr(node, "transB", 0) else weight.shape[1]
        ctx.new_source(node, node.outputs[0], n_out, axis=1)

    def rewrite(self, node, rw):
        weight = node.inputs[1].values
        trans_b = attr(node, "transB", 0)
        in_mask, out_mask = rw.mask(node.inputs[0]), rw.mask(node.outputs[0])
        if in_mask is not None:
            weight = np.compress(in_mask, weight, axis=1 if trans_b else 0)
        if out_mask is not None:
            weight = np.compress(out_mask, weight, axis=0 if trans_b else 1)
            if has_input(node, 2):
                bias = node.inputs[2].values
                if bias.ndim and bias.shape[-1] == len(out_mask):
                    rw.set_input(node, 2, np.compress(out_mask, bias, axis=bias.ndim - 1))
        rw.set_input(node, 1, weight)

    def filter_weights(self, node):
        weight = node.inputs[1].values
        return weight if attr(node, "transB", 0) else weight.T


@register("MatMul")
class MatMulHandler(MatrixWeight):
    def weight_layout(self, op, attrs, weight_shape):
        return self.matrix_layout(op, weight_shape, 0)

    def propagate(self, node, ctx):
        weight = const_input(node, 1)
        x = ctx.channels(node.inputs[0])
        if weight is None and const_input(node, 0) is None:
            propagate_product(node, ctx)
            return
        if weight is None or weight.ndim != 2:
            ctx.block_inputs(node, "MatMul without a constant 2-D weight (e.g. attention)")
            return
        ctx.block_unexpected(node, channel_inputs=(0,))
        shape = ctx.shape(node.inputs[0])
        if shape is None or len(shape) < 2:
            if x is not None:
                ctx.block(x.ids, f"MatMul '{node.name}': input shape unknown or 1-D")
            return
        rank = len(shape)
        if x is not None and x.axis != rank - 1:
            ctx.set(node.outputs[0], x)  # channels on a batch/row axis pass through
            return
        ctx.new_source(node, node.outputs[0], weight.shape[1], axis=rank - 1)

    def rewrite(self, node, rw):
        if not rw.is_source(node):
            return  # channels passed through on a non-feature axis: nothing to slice
        weight = node.inputs[1].values
        in_mask, out_mask = rw.mask(node.inputs[0]), rw.mask(node.outputs[0])
        if in_mask is not None:
            weight = weight[in_mask]
        if out_mask is not None:
            weight = weight[:, out_mask]
        rw.set_input(node, 1, weight)

    def filter_weights(self, node):
        return node.inputs[1].values.T


def propagate_product(node, ctx) -> None:
    """A MatMul of two computed operands: channels on a batch axis, A's rows or B's columns pass to the
    output (joined when both operands carry them on one batch axis); contracted channels are blocked."""
    tracked = [(i, m) for i, t in enumerate(node.inputs) if (m := ctx.channels(t)) is not None]
    if not tracked:
        return
    shapes = [ctx.shape(t) for t in node.inputs]
    out_shape = ctx.shape(node.outputs[0])
    if out_shape is None or any(shape is None or len(shape) < 2 for shape in shapes):
        ctx.block_inputs(node, "product of computed operands with unknown or 1-D shapes")
        return
    rank = len(out_shape)
    landed = {_product_axis(i, m.axis, len(shapes[i]), rank) for i, m in tracked}
    if None in landed:
        ctx.block_inputs(node, "channels are contracted with a computed operand")
        return
    if len(landed) > 1:
        ctx.block_inputs(node, "operands carry channels on different axes")
        return
    axis, (first_index, first) = landed.pop(), tracked[0]
    if len(tracked) == 2:
        if len(tracked[1][1].ids) != len(first.ids):
            ctx.block_inputs(node, "operands carry different channel counts")
            return
        ctx.join(first.ids, tracked[1][1].ids)
    elif axis < rank - 2 and _batch_dim(shapes[1 - first_index], axis, rank) != 1:
        ctx.block_inputs(node, f"operand '{node.inputs[1 - first_index].name}' spans the channels but is not tracked")
        return
    ctx.set(node.outputs[0], type(first)(axis, first.ids))


def _product_axis(operand: int, axis: int, rank: int, out_rank: int) -> int | None:
    """The output axis of a MatMul that channels on `axis` of operand 0 (A) or 1 (B) reach; None when
    contracted. Batch axes align from the right; A's rows and B's columns keep their place."""
    if axis == (rank - 1 if operand == 0 else rank - 2):
        return None
    return axis + out_rank - rank


def _batch_dim(shape, axis: int, out_rank: int) -> int:
    """The size of `shape` at output batch axis `axis` (1 where it broadcasts for want of axes)."""
    offset = axis - (out_rank - len(shape))
    return shape[offset] if offset >= 0 else 1
