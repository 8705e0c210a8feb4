"""Conv and ConvTranspose: plain (group=1), grouped and depthwise.

- group == 1: input channels are consumed (weight slices), output channels are a new source.
- depthwise (one input channel per group): output channel o depends on input channel o // m alone, so
  the output carries the input's channels, each repeated m times (m = channel multiplier); `group`
  shrinks with them.
- other grouped convs: channel j of every group block is kept or removed together (on the input and,
  as a new source, on the output), so that `group` stays and every block keeps the same width.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Handler, attr, const_input, has_input, register


def _layout(node: gs.Node, weight: np.ndarray):
    """(input channels, output channels, groups) of a Conv or ConvTranspose weight."""
    groups = int(attr(node, "group", 1))
    if node.op == "Conv":
        return weight.shape[1] * groups, weight.shape[0], groups
    return weight.shape[0], weight.shape[1] * groups, groups


@register("Conv", "ConvTranspose")
class ConvHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        weight = const_input(node, 1)
        x = ctx.channels(node.inputs[0])
        if weight is None or (has_input(node, 2) and const_input(node, 2) is None):
            if x is not None:
                ctx.block(x.ids, f"{node.op} '{node.name}': weight or bias is not a constant")
            return
        if x is not None and x.axis != 1:
            ctx.block(x.ids, f"{node.op} '{node.name}': channels arrive on axis {x.axis}, not 1")
            x = None
        c_in, c_out, groups = _layout(node, weight)
        y = node.outputs[0]
        if groups == 1:
            ctx.new_source(node, y, c_out, axis=1)
            return
        if groups == c_in:  # depthwise: output channels follow input channels
            if x is not None:
                ctx.set(y, type(x)(1, np.repeat(x.ids, c_out // c_in)))
            return
        if x is not None:
            blocks = x.ids.reshape(groups, c_in // groups)
            for b in range(1, groups):
                ctx.join(blocks[0], blocks[b])
        out = ctx.new_source(node, y, c_out, axis=1).reshape(groups, c_out // groups)
        for b in range(1, groups):
            ctx.join(out[0], out[b])

    def rewrite(self, node, rw):
        weight = node.inputs[1].values
        c_in, c_out, groups = _layout(node, weight)
        in_mask, out_mask = rw.mask(node.inputs[0]), rw.mask(node.outputs[0])
        out_axis, in_axis = (0, 1) if node.op == "Conv" else (1, 0)
        depthwise = groups > 1 and groups == c_in
        if in_mask is not None:
            if depthwise and node.op == "Conv":
                pass  # the output mask (the input's, repeated) removes the filters below
            elif depthwise:
                weight = weight[in_mask]
            else:
                per_block = in_mask if node.op == "ConvTranspose" else in_mask.reshape(groups, -1)[0]
                weight = np.compress(per_block, weight, axis=in_axis)
            if depthwise:
                rw.set_attr(node, "group", int(in_mask.sum()))
        if out_mask is not None:
            per_block = out_mask.reshape(groups, -1)[0] if node.op == "ConvTranspose" and not depthwise else out_mask
            if not (depthwise and node.op == "ConvTranspose"):
                weight = np.compress(per_block, weight, axis=out_axis)
            if has_input(node, 2):
                rw.set_input(node, 2, node.inputs[2].values[out_mask])
        rw.set_input(node, 1, weight)

    def filter_weights(self, node):
        weight = node.inputs[1].values
        if node.op == "Conv":
            return weight.reshape(weight.shape[0], -1)
        c_in, c_out, groups = _layout(node, weight)
        # [C_in, C_out/g, k...] -> [C_out, (C_in/g) * k]
        blocks = weight.reshape(groups, c_in // groups, weight.shape[1], -1)
        return blocks.transpose(0, 2, 1, 3).reshape(c_out, -1)
