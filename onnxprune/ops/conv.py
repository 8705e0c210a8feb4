"""Conv and ConvTranspose: plain (group=1), grouped and depthwise.

- group == 1: input channels are consumed (weight slices), output channels are a new source.
- depthwise (one input channel per group): output channel o depends on input channel o // m alone, so
  the output carries the input's channels, each repeated m times (m = channel multiplier); `group`
  shrinks with them.
- other grouped convs: channel j of every group block is kept or removed together (on the input and,
  as a new source, on the output), so that `group` stays and every block keeps the same width.

Weight layout: Conv [C_out, C_in / g, k...], ConvTranspose [C_in, C_out / g, k...]. Input features are
ordered input channel, then kernel offset (im2col order); a ConvTranspose output o reads input i where
i * stride - pad + tap * dilation = o.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Handler, WeightLayout, const_input, has_input, register, text, weight_axis_ids, window_problem


@register("Conv", "ConvTranspose")
class ConvHandler(Handler):
    channel_inputs = (0,)  # inputs whose channels it reads (FusedConv adds its residual Z)

    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=self.channel_inputs)
        weight = const_input(node, 1)
        x = ctx.channels(node.inputs[0])
        if weight is None or (has_input(node, 2) and const_input(node, 2) is None):
            if x is not None:
                ctx.block(x.ids, f"{node.op} '{node.name}': weight or bias is not a constant")
            return
        if x is not None and x.axis != 1:
            ctx.block(x.ids, f"{node.op} '{node.name}': channels arrive on axis {x.axis}, not 1")
            x = None
        c_in, c_out, groups = self._channels(node, weight)
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
        c_in, c_out, groups = self._channels(node, weight)
        in_mask, out_mask = rw.mask(node.inputs[0]), rw.mask(node.outputs[0])
        transposed = node.op == "ConvTranspose"
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        depthwise = groups > 1 and groups == c_in
        if in_mask is not None:
            if depthwise and not transposed:
                pass  # the output mask (the input's, repeated) removes the filters below
            elif depthwise:
                weight = weight[in_mask]
            else:
                per_block = in_mask if transposed else in_mask.reshape(groups, -1)[0]
                weight = np.compress(per_block, weight, axis=in_axis)
            if depthwise:
                rw.set_attr(node, "group", int(in_mask.sum()))
        if out_mask is not None:
            per_block = out_mask.reshape(groups, -1)[0] if transposed and not depthwise else out_mask
            if not (depthwise and transposed):
                weight = np.compress(per_block, weight, axis=out_axis)
            if has_input(node, 2):
                rw.set_input(node, 2, node.inputs[2].values[out_mask])
        rw.set_input(node, 1, weight)

    def weight_channels(self, node, ctx):
        found = self.constant_weight(node)
        if found is None:
            return None
        weight, layout = found
        x, y = ctx.channels(node.inputs[0]), ctx.channels(node.outputs[0])
        in_ids = weight_axis_ids(x, 1, weight.shape[layout.in_axis], layout.groups)
        out_ids = weight_axis_ids(y, 1, weight.shape[layout.out_axis], layout.groups)
        if layout.depthwise:  # one axis is sliced: a Conv's filters by its output, a ConvTranspose's by its input
            return weight, {layout.in_axis: in_ids} if layout.transposed else {layout.out_axis: out_ids}
        return weight, {layout.in_axis: in_ids, layout.out_axis: out_ids}

    def channel_padded(self, node):
        return node.op == "Conv"  # not ConvTranspose, which onnxruntime leaves in its plain layout

    def filter_weights(self, node):
        weight = node.inputs[1].values
        if node.op != "ConvTranspose":
            return weight.reshape(weight.shape[0], -1)
        c_in, c_out, groups = self._channels(node, weight)
        # [C_in, C_out/g, k...] -> [C_out, (C_in/g) * k]
        blocks = weight.reshape(groups, c_in // groups, weight.shape[1], -1)
        return blocks.transpose(0, 2, 1, 3).reshape(c_out, -1)

    def _channels(self, node: gs.Node, weight: np.ndarray) -> tuple[int, int, int]:
        layout = self.weight_layout(node.op, node.attrs, weight.shape)
        return layout.in_channels, layout.out_channels, layout.groups

    # ---- weight layout
    def weight_layout(self, op, attrs, weight_shape):
        if len(weight_shape) < 3:
            return None
        groups = int(attrs.get("group", 1))
        first, second = weight_shape[:2]
        kernel = tuple(weight_shape[2:])
        if op != "ConvTranspose":  # Conv, and onnxruntime's FusedConv (`fused.py`)
            return WeightLayout(op, weight_shape, second * groups, first, 1, 0, groups, kernel, bias_input=2)
        return WeightLayout(op, weight_shape, first, second * groups, 0, 1, groups, kernel, transposed=True,
                            bias_input=2)

    def to_matrix(self, layout, weight):
        g = layout.groups
        if not layout.transposed:  # [M, C/g, k...]
            return weight.reshape(g, layout.out_channels // g, -1).transpose(0, 2, 1)
        c, per_group = weight.shape[:2]  # [C, M/g, k...]
        return weight.reshape(g, c // g, per_group, -1).transpose(0, 1, 3, 2).reshape(g, -1, per_group)

    def from_matrix(self, layout, matrix):
        if not layout.transposed:
            return matrix.transpose(0, 2, 1).reshape(layout.shape)
        c, per_group = layout.shape[:2]
        return matrix.reshape(layout.groups, c // layout.groups, -1, per_group).transpose(0, 1, 3, 2).reshape(layout.shape)

    def input_factors(self, layout, factors):
        spread = (1,) * len(layout.kernel)
        if layout.transposed:
            return factors.reshape((-1, 1) + spread)
        g, per_group, out = layout.groups, layout.shape[1], layout.out_channels
        blocks = factors.reshape(g, 1, per_group)  # filters of block b read input channels of block b
        return np.broadcast_to(blocks, (g, out // g, per_group)).reshape((out, per_group) + spread)

    def rows(self, layout, out_shape):
        return int(out_shape[0] * np.prod(out_shape[2:], dtype=np.int64))

    def positions(self, layout, out_shape):
        return int(np.prod(out_shape[2:], dtype=np.int64))

    def output_rows(self, layout, y, rows):
        if isinstance(rows, slice):
            y = np.moveaxis(y, 1, -1)
            return y.reshape(-1, y.shape[-1])[rows]
        item, position = np.divmod(rows, self.positions(layout, y.shape))
        return y.reshape(y.shape[0], y.shape[1], -1)[item, :, position]  # gathers R x C, not the whole output

    def output_spatial(self, layout, attrs, in_dims) -> list[int]:
        """The output's spatial size for an input of spatial size `in_dims` (Conv)."""
        spatial = len(layout.kernel)
        strides = attrs.get("strides") or [1] * spatial
        dilations = attrs.get("dilations") or [1] * spatial
        if text(attrs.get("auto_pad", "NOTSET")) in ("SAME_UPPER", "SAME_LOWER"):
            return [-(-i // s) for i, s in zip(in_dims, strides)]
        pads = [0] * 2 * spatial if text(attrs.get("auto_pad", "NOTSET")) == "VALID" else \
            list(attrs.get("pads") or [0] * 2 * spatial)
        return [(i + pads[d] + pads[d + spatial] - (k - 1) * dl - 1) // s + 1
                for d, (i, k, s, dl) in enumerate(zip(in_dims, layout.kernel, strides, dilations))]

    def input_rows(self, layout, attrs, x, out_shape, rows):
        patches = conv_patches(layout, attrs, x, tuple(out_shape[2:]), rows)
        r, c, k = patches.shape
        return patches.reshape(r, layout.groups, (c // layout.groups) * k)

    def attribute_problem(self, op, attrs, in_shapes, out_shapes):
        group = int(attrs.get("group", 1))
        if group < 1:
            return f"group {group} must be positive"
        x = in_shapes[0] if in_shapes else None
        channels = x[1] if x is not None and len(x) > 1 else None
        if channels and channels % group:
            return f"group {group} does not divide its {channels} input channels"
        return window_problem(attrs, x, out_shapes[0] if out_shapes else None)

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        if weight_shape is None:
            return None
        per_element = _prod(weight_shape[1:])  # Conv: per output element; ConvTranspose: per input element
        if op != "ConvTranspose" and out_shape:
            return _prod(out_shape) * per_element
        if op == "ConvTranspose" and in_shape:
            return _prod(in_shape) * per_element
        return None


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64))


def pads_begin(layout: WeightLayout, attrs: dict, in_dims, out_dims) -> list[int]:
    """Padding before each spatial axis, resolving auto_pad (and a ConvTranspose's output_shape) as
    onnxruntime does."""
    kernel, spatial = layout.kernel, len(layout.kernel)
    strides = attrs.get("strides") or [1] * spatial
    dilations = attrs.get("dilations") or [1] * spatial
    auto_pad = text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad == "VALID":
        return [0] * spatial
    if auto_pad == "NOTSET" and (not layout.transposed or attrs.get("output_shape") is None):
        return list(attrs.get("pads") or [0] * 2 * spatial)[:spatial]
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if not layout.transposed:
        total = [max(0, (o - 1) * s + r - i) for o, s, r, i in zip(out_dims, strides, reach, in_dims)]
    else:
        extra = attrs.get("output_padding") or [0] * spatial
        total = [s * (i - 1) + e + r - o for s, i, e, r, o in zip(strides, in_dims, extra, reach, out_dims)]
    if auto_pad == "SAME_UPPER":
        return [t // 2 for t in total]
    return [t - t // 2 for t in total]


def conv_patches(layout: WeightLayout, attrs: dict, x: np.ndarray, out_dims: tuple, rows: np.ndarray) -> np.ndarray:
    """im2col for Conv and ConvTranspose: for output positions `rows` (flat indices into
    [N, *out_dims]), the input values each output reads, as [R, input channels, kernel elements]; zero
    where a kernel tap falls in the padding (or, for ConvTranspose, between input samples). One
    fancy-index gather over all taps, no loops over channels."""
    kernel = list(layout.kernel)
    spatial = len(kernel)
    strides = attrs.get("strides") or [1] * spatial
    dilations = attrs.get("dilations") or [1] * spatial
    in_dims = list(x.shape[2:])
    begin = pads_begin(layout, attrs, in_dims, out_dims)
    coords = np.unravel_index(rows, [x.shape[0], *out_dims])
    count = len(rows)
    index, valid = [], np.ones([count] + kernel, dtype=bool)
    for d in range(spatial):  # one step per spatial axis
        taps = np.arange(kernel[d]) * dilations[d]
        out = coords[1 + d][:, None]
        if not layout.transposed:
            pos = out * strides[d] - begin[d] + taps
            ok = (pos >= 0) & (pos < in_dims[d])
        else:
            shifted = out + begin[d] - taps
            pos = shifted // strides[d]
            ok = (shifted % strides[d] == 0) & (pos >= 0) & (pos < in_dims[d])
        shape = [count] + [1] * spatial
        shape[1 + d] = kernel[d]
        index.append(np.clip(pos, 0, in_dims[d] - 1).reshape(shape))
        valid &= ok.reshape(shape)
    batch = coords[0].reshape([count] + [1] * spatial)
    patches = np.moveaxis(x, 1, -1)[(batch, *index)] * valid[..., None]  # [R, *kernel, C]
    return patches.reshape(count, -1, x.shape[1]).transpose(0, 2, 1)
