"""Normalisation layers.

BatchNormalization and InstanceNormalization act per channel: channels pass through and their
parameters are sliced. GroupNormalization normalises over groups of channels, so a whole group is kept
or removed (its channels are joined) and `num_groups` shrinks; torch's spelling of it below opset 18
(Reshape to [N, G, -1], InstanceNormalization with G ones and zeros, Reshape back to Shape(x), Mul, Add) is
followed node by node: the Reshapes make the G groups units (ops/layout.py) and InstanceNormalization
slices its per-group scale and bias here. LayerNormalization and LRN mix the channels they normalise
over: channels on a normalised axis are blocked, others pass through (onnxruntime's
SimplifiedLayerNormalization, an RMSNorm, like LayerNormalization).

With the hidden-size option (`--hidden`, `base.HIDDEN`), a LayerNormalization or RMSNorm over the channel
axis alone passes the channels on and its scale and bias are sliced. An RMSNorm stays exact when the removed
channels carry zeros: its scale grows by sqrt(N/K) and its epsilon by N/K (N channels before, K after), so
the root mean square over K is the one over N. A LayerNormalization cannot be: its mean over the kept
channels differs from the one over all by a share of each sample's own mean, so the group is `inexact`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import HIDDEN, MICROSOFT, Handler, attr, normalize_axis, pass_through, register

NORMS_OVER_LAST = ("LayerNormalization", "SimplifiedLayerNormalization")  # the latter: onnxruntime's RMSNorm


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

    def per_channel(self, node):
        return True


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

    domains = (MICROSOFT,)  # a LayerNormalization or SimplifiedLayerNormalization some exporters put there

    def hidden_width(self, node, ctx):
        shape = ctx.shape(node.inputs[0])
        if node.op not in NORMS_OVER_LAST or not shape:
            return None
        return shape[-1] if normalize_axis(int(attr(node, "axis", -1)), len(shape)) == len(shape) - 1 else None

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
        if node.op in NORMS_OVER_LAST:
            mixed = range(normalize_axis(int(attr(node, "axis", -1)), rank), rank)
        elif node.op == "LpNormalization":
            mixed = [normalize_axis(int(attr(node, "axis", -1)), rank)]
        elif node.op == "LRN":
            mixed = [1]
        else:
            mixed = [normalize_axis(a, rank) for a in attr(node, "axes", [0, 2, 3])]
        if x.axis in mixed and list(mixed) == [x.axis] and node.op in NORMS_OVER_LAST and ctx.allows(HIDDEN):
            if any(not is_const(t) for t in node.inputs[1:3] if t.name):
                ctx.block(x.ids, f"{node.op} '{node.name}': scale or bias is not a constant")
                return
            pass_through(node, ctx, outputs=(0,))
            hidden_norm(node, ctx, x.ids, centred=node.op == "LayerNormalization")
            return
        if x.axis in mixed:
            reason = "normalises across the channel axis"
            if node.op in NORMS_OVER_LAST and list(mixed) == [x.axis]:
                reason += " (the hidden size), which --hidden prunes"
            ctx.block(x.ids, f"{node.op} '{node.name}': {reason}")
            return
        pass_through(node, ctx, outputs=(0,))

    def rewrite(self, node, rw):
        mask = rw.mask(node.inputs[0])
        if mask is None or node.op not in NORMS_OVER_LAST or rw.tracked_axis(node.inputs[0]) != rw.rank(node.inputs[0]) - 1:
            return  # channels off the normalised axis: nothing of the node changes
        slice_norm_parameters(node, rw, mask, first=1)


def slice_norm_parameters(node, rw, mask: np.ndarray, first: int) -> None:
    """Slice the scale (input `first`) and bias (the next input, if any) of a norm over the last axis to
    the kept channels; an RMSNorm's scale and epsilon are changed so that it stays exact (module doc)."""
    for i in (first, first + 1):
        if i < len(node.inputs) and node.inputs[i].name:
            rw.set_input(node, i, node.inputs[i].values[..., mask])
    if "Simplified" in node.op:
        keep_root_mean_square(node, rw, first, len(mask) / int(mask.sum()), default_epsilon=1e-5)


def hidden_norm(node, ctx, ids, centred: bool) -> None:
    """A norm over the hidden size passes `ids` on under --hidden: inexact when it subtracts the mean
    (LayerNorm: mean and variance change with the channels removed), exact for an RMSNorm (rescaled by
    `keep_root_mean_square`); either way a graph output carrying them keeps its width."""
    if centred:
        ctx.inexact(ids, f"{node.op} '{node.name}': normalises over the hidden size (--hidden): its mean and "
                         "variance change with the channels removed")
    else:
        ctx.widen(ids)


def keep_root_mean_square(node, rw, scale_input: int, ratio: float, default_epsilon: float) -> None:
    """An RMSNorm left with 1/`ratio` of its channels: scale times sqrt(ratio), epsilon (its op's default
    when the attribute is absent) times `ratio`, so that its output is unchanged when the removed channels
    were zero (module doc)."""
    rw.set_input(node, scale_input, node.inputs[scale_input].values * np.sqrt(ratio))
    rw.set_attr(node, "epsilon", float(attr(node, "epsilon", default_epsilon)) * ratio)
