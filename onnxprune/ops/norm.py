"""Normalisation layers.

BatchNormalization and InstanceNormalization act per channel: channels pass through and their
parameters are sliced. GroupNormalization normalises over groups of channels, so a whole group is kept
or removed (its channels are joined) and `num_groups` shrinks. LayerNormalization and LRN mix the
channels they normalise over: channels on a normalised axis are blocked, others pass through
(onnxruntime's SimplifiedLayerNormalization, an RMSNorm, like LayerNormalization).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Handler, attr, normalize_axis, pass_through, register


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNormHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            ctx.block(x.ids, f"{node.op} '{node.name}': channels arrive on axis {x.axis}, not 1")
            return
        if any(not is_const(t) for t in node.inputs[1:]):
            ctx.block(x.ids, f"{node.op} '{node.name}': parameters are not constants")
            return
        pass_through(node, ctx, outputs=(0,))
        if len(node.outputs) > 1 and any(t.name for t in node.outputs[1:]):
            ctx.block(x.ids, f"{node.op} '{node.name}': training-mode outputs are used")

    def rewrite(self, node, rw):
        mask = rw.mask(node.inputs[0])
        if mask is None:
            return
        for i in range(1, len(node.inputs)):
            rw.set_input(node, i, node.inputs[i].values[mask])

    def channel_scales(self, node):
        return np.abs(node.inputs[1].values)


def is_const(tensor):
    return isinstance(tensor, gs.Constant)


@register("GroupNormalization")
class GroupNormHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        if x.axis != 1 or any(not is_const(t) for t in node.inputs[1:]):
            ctx.block(x.ids, f"GroupNormalization '{node.name}': channels not on axis 1 or parameters not constant")
            return
        per_group = x.ids.reshape(int(node.attrs["num_groups"]), -1)
        for j in range(1, per_group.shape[1]):
            ctx.join(per_group[:, 0], per_group[:, j])
        pass_through(node, ctx)

    def rewrite(self, node, rw):
        mask = rw.mask(node.inputs[0])
        if mask is None:
            return
        groups = int(node.attrs["num_groups"])
        kept_groups = mask.reshape(groups, -1)[:, 0]
        for i in (1, 2):
            values = node.inputs[i].values
            rw.set_input(node, i, values[kept_groups] if len(values) == groups else values[mask])
        rw.set_attr(node, "num_groups", int(kept_groups.sum()))

    def channel_scales(self, node):
        scale = np.abs(node.inputs[1].values)
        groups = int(node.attrs["num_groups"])
        return scale if len(scale) != groups else None


@register("LayerNormalization", "SimplifiedLayerNormalization", "LpNormalization", "LRN", "MeanVarianceNormalization")
class CrossChannelNormHandler(Handler):
    """Normalises over some axes: channels there are blocked, channels elsewhere pass through."""

    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        if shape is None:
            ctx.block(x.ids, f"{node.op} '{node.name}': input shape unknown")
            return
        rank = len(shape)
        if node.op in ("LayerNormalization", "SimplifiedLayerNormalization"):  # the latter: onnxruntime's RMSNorm
            mixed = range(normalize_axis(int(attr(node, "axis", -1)), rank), rank)
        elif node.op == "LpNormalization":
            mixed = [normalize_axis(int(attr(node, "axis", -1)), rank)]
        elif node.op == "LRN":
            mixed = [1]
        else:
            mixed = [normalize_axis(a, rank) for a in attr(node, "axes", [0, 2, 3])]
        if x.axis in mixed:
            ctx.block(x.ids, f"{node.op} '{node.name}': normalises across the channel axis")
            return
        pass_through(node, ctx, outputs=(0,))
