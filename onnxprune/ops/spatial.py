"""Ops that work along spatial or other non-channel axes: pooling, reductions, Resize, Pad, Softmax, and
the ops that move channels into space and back: DepthToSpace (torch's PixelShuffle), SpaceToDepth."""

from __future__ import annotations

import numpy as np

from .base import (HIDDEN, Handler, attr, const_input, has_input, join_rows, normalize_axis, pass_through, register, text,
                   window_problem)
from .layout import axes_input, resize_sizes_follow_input


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
class PoolHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            ctx.block(x.ids, f"{node.op} '{node.name}': channels arrive on axis {x.axis}, not 1")
            return
        if len(node.outputs) > 1 and node.outputs[1].name:
            ctx.block(x.ids, f"{node.op} '{node.name}': its Indices output depends on channel positions")
            return
        pass_through(node, ctx)

    def attribute_problem(self, op, attrs, in_shapes, out_shapes):
        if op.startswith("Global") or op == "MaxRoiPool":
            return None
        return window_problem(attrs, in_shapes[0] if in_shapes else None, out_shapes[0] if out_shapes else None)


REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@register(*REDUCE)
class ReduceHandler(Handler):
    """Reducing spatial axes keeps channels (squeeze-excite); reducing the channel axis blocks, but for a
    LayerNorm or RMSNorm spelled out (ReduceMean over the last axis, kept as size 1: its mean or mean
    square) under --hidden, which passes the hidden size through it as through LayerNormalization:
    inexactly, the statistic changing with the channels removed."""

    def hidden_width(self, node, ctx):
        shape = ctx.shape(node.inputs[0])
        return shape[-1] if shape and self._over_last_axis(node, len(shape)) else None

    @staticmethod
    def _over_last_axis(node, rank: int) -> bool:
        """A ReduceMean over the last axis alone, kept (a norm's statistic)."""
        axes = axes_input(node)
        if node.op != "ReduceMean" or axes is None or not attr(node, "keepdims", 1):
            return False
        return {normalize_axis(a, rank) for a in axes} == {rank - 1}

    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        axes = attr(node, "axes")
        if axes is None and has_input(node, 1):
            axes = const_input(node, 1)
            if axes is None:
                ctx.block(x.ids, f"{node.op} '{node.name}': reduction axes are computed")
                return
        if shape is None:
            ctx.block(x.ids, f"{node.op} '{node.name}': input shape unknown")
            return
        rank = len(shape)
        if axes is None or len(np.asarray(axes).reshape(-1)) == 0:
            if attr(node, "noop_with_empty_axes", 0):
                pass_through(node, ctx)
                return
            axes = range(rank)
        axes = {normalize_axis(int(a), rank) for a in np.asarray(list(axes)).reshape(-1)}
        if x.axis in axes:
            statistic = x.axis == rank - 1 and self._over_last_axis(node, rank)  # a spelled-out norm's
            if statistic and ctx.allows(HIDDEN):
                ctx.inexact(x.ids, f"{node.op} '{node.name}': a mean over the hidden size (--hidden; a spelled-out "
                                   "norm's statistic): it changes with the channels removed")
                return  # its output, one value per position, carries no channels
            hint = ", which --hidden prunes" if statistic else ""
            ctx.block(x.ids, f"{node.op} '{node.name}': reduces over the channel axis{hint}")
            return
        axis = x.axis if attr(node, "keepdims", 1) else x.axis - sum(a < x.axis for a in axes)
        ctx.set(node.outputs[0], type(x)(axis, x.ids))


@register("Resize", "Upsample")
class ResizeHandler(Handler):
    """Resizing spatial axes keeps channels; a `sizes` input names the channel count and is updated."""

    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        ctx.block_unexpected(node, channel_inputs=(0,))
        in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        if in_shape is None or out_shape is None or in_shape[x.axis] != out_shape[x.axis]:
            ctx.block(x.ids, f"{node.op} '{node.name}': resizes the channel axis or shape unknown")
            return
        sizes_index = 3 if node.op == "Resize" else None
        if (sizes_index and has_input(node, sizes_index) and const_input(node, sizes_index) is None
                and not resize_sizes_follow_input(node, x.axis)):
            ctx.block(x.ids, f"{node.op} '{node.name}': output sizes are computed")
            return
        pass_through(node, ctx)

    def rewrite(self, node, rw):
        mask = rw.mask(node.inputs[0])
        if mask is None or node.op != "Resize" or not has_input(node, 3) or const_input(node, 3) is None:
            return  # computed sizes follow the input (`resize_sizes_follow_input`)
        sizes = node.inputs[3].values.copy()
        rank = rw.rank(node.inputs[0])
        axes = [normalize_axis(a, rank) for a in attr(node, "axes", range(rank))]
        axis = rw.tracked_axis(node.inputs[0])
        if axis in axes:
            sizes[axes.index(axis)] = mask.sum()
            rw.set_input(node, 3, sizes)


@register("Pad")
class PadHandler(Handler):
    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        ctx.block_unexpected(node, channel_inputs=(0,))
        in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        if in_shape is None or out_shape is None or in_shape[x.axis] != out_shape[x.axis]:
            ctx.block(x.ids, f"Pad '{node.name}': pads the channel axis or shape unknown")
            return
        pass_through(node, ctx)


@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxHandler(Handler):
    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        if shape is None:
            ctx.block(x.ids, f"{node.op} '{node.name}': input shape unknown")
            return
        rank = len(shape)
        if ctx.opset >= 13:
            mixed = x.axis == normalize_axis(int(attr(node, "axis", -1)), rank)
        else:  # before opset 13 the input is coerced to 2-D at `axis`
            mixed = x.axis >= normalize_axis(int(attr(node, "axis", 1)), rank)
        if mixed:
            ctx.block(x.ids, f"{node.op} '{node.name}': normalises across the channel axis")
            return
        pass_through(node, ctx)


@register("DepthToSpace", "SpaceToDepth")
class BlockMoveHandler(Handler):
    """DepthToSpace spreads each output channel's r*r input channels (blocksize r) over an r x r block of
    pixels: those input channels are one unit, kept or removed whole. Mode CRD (torch's PixelShuffle) reads
    output channel c from input channels c*r*r .. c*r*r + r*r - 1, mode DCR from c, c + C, ..., C output
    channels in all. SpaceToDepth (DCR's inverse) writes input channel c to output channels c, c + C, ...:
    the same channel at r*r places. Nothing of the node changes: the counts follow its input."""

    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        if x.axis != 1 or x.ids.ndim != 1:
            where = f"on axis {x.axis}, not 1" if x.axis != 1 else "as units over several axes (heads)"
            ctx.block(x.ids, f"{node.op} '{node.name}': channels arrive {where}")
            return
        block = int(attr(node, "blocksize")) ** 2
        if node.op == "SpaceToDepth":
            ctx.set(node.outputs[0], type(x)(1, np.tile(x.ids, block)))
            return
        crd = text(attr(node, "mode", "DCR")) == "CRD"
        units = x.ids.reshape(-1, block) if crd else x.ids.reshape(block, -1).T
        join_rows(ctx, units)
        ctx.set(node.outputs[0], type(x)(1, units[:, 0]))
