"""Consumer layers of prunable channels, and the input patches they see.

A *consumer* is a Conv or ConvTranspose (not depthwise: a depthwise conv passes channels on), Gemm or
MatMul with a constant weight whose input 0 carries tracked channels as its input features. Pruning a
group removes input channels of its consumers, so the data-informed scorers measure what the consumers
receive. A ConvTranspose is described by its equivalent Conv (stride 1 over the input with zeros
inserted between samples, flipped and transposed kernel). Recurrent layers are not consumers here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ops.base import attr, const_input


@dataclass
class Consumer:
    node: gs.Node
    tensor: str  # the input activation
    units: np.ndarray  # unit label of every input channel (feature) position
    weight: np.ndarray  # float32, conv: [F, C/groups, *kernel]; linear: [F, C]
    kind: str  # "conv" or "linear"
    groups: int = 1
    strides: tuple = ()
    dilations: tuple = ()
    pads: tuple = ()  # begin..., end...
    out_spatial: tuple = ()
    rows: int = 1  # linear: rows per sample (tokens of a MatMul, 1 for Gemm)
    upsample: tuple = ()  # ConvTranspose: its strides (zeros inserted into the input), for the equivalent Conv

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def channels(self) -> int:
        return len(self.units)

    @property
    def kernel(self) -> int:
        """Kernel elements per input channel (K_l in the paper's sample complexity)."""
        return int(np.prod(self.weight.shape[2:], dtype=np.int64)) if self.kind == "conv" else 1

    @property
    def positions(self) -> int:
        """Output positions per sample (P_l): conv output pixels, or rows of a linear layer."""
        return int(np.prod(self.out_spatial, dtype=np.int64)) if self.kind == "conv" else self.rows

    @property
    def fan_in(self) -> int:
        return self.weight[0].size

    @property
    def axis(self) -> int:
        """The input's channel axis."""
        return 1 if self.kind == "conv" or self.node.op == "Gemm" else -1

    def channel_weight_sums(self) -> np.ndarray:
        """Per input channel: sum of |W| over the output features (and kernel) that read it."""
        magnitude = np.abs(self.weight.astype(np.float64))
        if self.kind == "linear":
            return magnitude.sum(0)
        f, per_group = magnitude.shape[:2]
        return magnitude.reshape(self.groups, f // self.groups, per_group, -1).sum((1, 3)).reshape(-1)


def find_consumers(analysis) -> list[Consumer]:
    """Every consumer of a prunable group's channels, in graph order."""
    prunable = np.zeros(len(analysis.groups), dtype=bool)
    prunable[[g.index for g in analysis.prunable_groups()]] = True
    found = []
    for node in analysis.graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not node.inputs:
            continue
        cmap = analysis.maps.get(node.inputs[0].name)
        weight = const_input(node, 1)
        if cmap is None or weight is None or cmap.ids.ndim != 1:
            continue
        units = analysis.label[cmap.ids]
        owners = analysis.group_of[units]
        if not prunable[owners[owners >= 0]].any():
            continue
        consumer = _consumer(node, cmap, units, weight, analysis.shapes)
        if consumer is not None:
            found.append(consumer)
    return found


def _consumer(node, cmap, units, weight, shapes) -> Consumer | None:
    shape = shapes.get(node.inputs[0].name)
    if node.op == "ConvTranspose":
        return _transposed_consumer(node, cmap, units, weight, shape, shapes.get(node.outputs[0].name))
    if node.op == "Conv":
        groups = int(attr(node, "group", 1))
        if cmap.axis != 1 or (groups > 1 and weight.shape[1] == 1) or not shape or None in shape:
            return None  # depthwise: the channels flow on to the output
        out_shape = shapes.get(node.outputs[0].name)
        if not out_shape or None in out_shape:
            return None
        kernel = weight.shape[2:]
        strides = tuple(attr(node, "strides", None) or [1] * len(kernel))
        dilations = tuple(attr(node, "dilations", None) or [1] * len(kernel))
        out_spatial = tuple(int(d) for d in out_shape[2:])
        pads = _pads(node, shape[2:], kernel, strides, dilations, out_spatial)
        return Consumer(node, node.inputs[0].name, units, np.asarray(weight, dtype=np.float32), "conv", groups,
                        strides, dilations, pads, out_spatial)
    if node.op == "Gemm":
        if attr(node, "transA", 0) or cmap.axis != 1 or weight.ndim != 2:
            return None
        matrix = weight if attr(node, "transB", 0) else weight.T
        return Consumer(node, node.inputs[0].name, units, np.asarray(matrix, dtype=np.float32), "linear")
    if weight.ndim != 2 or not shape or None in shape or cmap.axis != len(shape) - 1:
        return None  # MatMul: channels on another axis pass through
    rows = int(np.prod(shape[1:-1], dtype=np.int64)) if len(shape) > 2 else 1
    return Consumer(node, node.inputs[0].name, units, np.asarray(weight, dtype=np.float32).T, "linear", rows=rows)


def _transposed_consumer(node, cmap, units, weight, shape, out_shape) -> Consumer | None:
    """A ConvTranspose as its equivalent Conv: out[o] = sum_k W[k] x_up[o + k d - (d (K - 1) - pad)]
    over the input with stride - 1 zeros between samples, kernel flipped, [C_in, C_out/g] -> [C_out, C_in/g]."""
    groups = int(attr(node, "group", 1))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if (cmap.axis != 1 or (groups > 1 and groups == weight.shape[0]) or auto_pad != "NOTSET"
            or attr(node, "output_shape", None) or not shape or None in shape or not out_shape or None in out_shape):
        return None  # depthwise (channels flow on), or padding that onnxruntime derives from output_shape
    kernel = weight.shape[2:]
    n = len(kernel)
    strides = tuple(attr(node, "strides", None) or [1] * n)
    dilations = tuple(attr(node, "dilations", None) or [1] * n)
    pads = tuple(attr(node, "pads", None) or [0] * (2 * n))
    c_in, per_group_out = weight.shape[:2]
    equivalent = weight.reshape(groups, c_in // groups, per_group_out, *kernel).swapaxes(1, 2)
    equivalent = np.flip(equivalent.reshape(groups * per_group_out, c_in // groups, *kernel), axis=tuple(range(2, 2 + n)))
    begin = tuple(d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:n]))
    return Consumer(node, node.inputs[0].name, units, np.ascontiguousarray(equivalent, dtype=np.float32), "conv",
                    groups, (1,) * n, dilations, begin + pads[n:], tuple(int(d) for d in out_shape[2:]),
                    upsample=strides)


def _pads(node, in_spatial, kernel, strides, dilations, out_spatial) -> tuple:
    """Explicit (begin..., end...) pads, resolving auto_pad as onnxruntime does."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i)
                 for i, o, k, s, d in zip(in_spatial, out_spatial, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        return tuple(small + big) if auto_pad == "SAME_UPPER" else tuple(big + small)
    if auto_pad == "VALID":
        return (0,) * (2 * n)
    pads = attr(node, "pads", None)
    return tuple(pads) if pads else (0,) * (2 * n)


def batch_rows(consumer: Consumer, activation: np.ndarray) -> np.ndarray:
    """A linear consumer's input as [samples * rows, C]."""
    return activation.reshape(-1, activation.shape[-1] if consumer.node.op == "MatMul" else activation.shape[1])


def conv_patches(consumer: Consumer, activation: np.ndarray, samples: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The input patches under output `positions` of batch items `samples`: [n, C * kernel], C-major
    (the order of `weight.reshape(F, -1)` per group). One fancy-index gather, no loops; padding is
    applied to the gathered patches only (indices outside the input read zeros)."""
    kernel = consumer.weight.shape[2:]
    spatial = len(kernel)
    if any(s > 1 for s in consumer.upsample):
        activation = _insert_zeros(activation, consumer.upsample)
    n, channels = len(samples), activation.shape[1]
    coords = np.unravel_index(positions, consumer.out_spatial)
    index = [samples.reshape((n,) + (1,) * (1 + spatial)),
             np.arange(channels).reshape((1, channels) + (1,) * spatial)]
    inside = np.ones((n, 1) + tuple(kernel), dtype=bool)
    for i in range(spatial):
        along = (coords[i][:, None] * consumer.strides[i] + np.arange(kernel[i])[None, :] * consumer.dilations[i]
                 - consumer.pads[i])
        shape = [n, 1] + [1] * spatial
        shape[2 + i] = kernel[i]
        valid = (along >= 0) & (along < activation.shape[2 + i])
        inside &= valid.reshape(shape)
        index.append(np.clip(along, 0, activation.shape[2 + i] - 1).reshape(shape))
    patches = activation[tuple(index)]
    if not inside.all():
        patches = patches * inside
    return patches.reshape(n, -1)


def _insert_zeros(activation: np.ndarray, strides: tuple) -> np.ndarray:
    """stride - 1 zeros between neighbouring samples along every spatial axis (a ConvTranspose's input)."""
    shape = activation.shape[:2] + tuple((d - 1) * s + 1 for d, s in zip(activation.shape[2:], strides))
    spread = np.zeros(shape, dtype=activation.dtype)
    spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = activation
    return spread
