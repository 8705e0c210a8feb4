"""Consumer layers of prunable channels, and the input patches they see.

A *consumer* is a weighted op (Conv or ConvTranspose that is not depthwise: a depthwise conv passes
channels on; Gemm; MatMul with a constant weight; a recurrent layer's W, whose product is its gates'
input part) whose input 0 carries tracked channels as its input features. Pruning a group removes input
channels of its consumers, so the data-informed scorers measure what the consumers receive. The op
handler's weight layout says how the weight and the input patches are laid out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ops.base import WeightLayout, const_input, filters, text, weighted, weighted_ops


@dataclass
class Consumer:
    node: gs.Node
    tensor: str  # the input activation
    units: np.ndarray  # unit label of every input channel (feature) position
    weight: np.ndarray  # float32, conv: [F, C/groups, *kernel]; linear: [F, C]
    kind: str  # "conv" or "linear"
    layout: WeightLayout
    positions: int  # output positions per sample (P_l): conv output pixels, or rows of a linear layer
    handler: object = field(repr=False)
    out_shape: tuple = ()  # convolutions: the output's shape, for the patches

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def channels(self) -> int:
        return len(self.units)

    @property
    def groups(self) -> int:
        return self.layout.groups

    @property
    def kernel(self) -> int:
        """Kernel elements per input channel (K_l in the paper's sample complexity)."""
        return self.layout.kernel_size

    @property
    def fan_in(self) -> int:
        return self.weight[0].size

    @property
    def axis(self) -> int:
        """The input's channel axis."""
        return self.layout.data_axis

    def channel_weight_sums(self) -> np.ndarray:
        """Per input channel: sum of |W| over the output features (and kernel) that read it; a weight
        over SUM_BLOCK_BYTES in blocks of output features (it may be a memory map of gigabytes)."""
        weight = self.weight
        f = weight.shape[0]
        outputs_per_group = f // self.groups
        block = max(1, min(f, SUM_BLOCK_BYTES // max(1, 8 * weight[0].size)))
        if self.kind != "linear":
            block = max(outputs_per_group, block - block % outputs_per_group)  # whole groups per block
        sums = []
        for start in range(0, f, block):
            magnitude = np.abs(np.asarray(weight[start:start + block], dtype=np.float64))
            if self.kind == "linear":
                sums.append(magnitude.sum(0))
            else:
                groups = len(magnitude) // outputs_per_group
                sums.append(magnitude.reshape(groups, outputs_per_group, magnitude.shape[1], -1).sum((1, 3)))
        if self.kind == "linear":
            return sums[0] if len(sums) == 1 else np.sum(sums, axis=0)
        return np.concatenate(sums).reshape(-1)

    def batch_points(self, chosen: np.ndarray, start: int, size: int) -> np.ndarray:
        """Of the sorted flat points `chosen` (sample * positions + position, see `choose_points`), those of
        samples start .. start + size - 1, as flat indices into that batch."""
        lo, hi = np.searchsorted(chosen, [start * self.positions, (start + size) * self.positions])
        return chosen[lo:hi] - start * self.positions

    def points(self, activation: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """The input features behind output positions `flat` (sample * positions + position) of a batch:
        [n, fan-in] in the order of `weight.reshape(F, -1)` per group."""
        rows = self.handler.input_rows(self.layout, self.node.attrs, activation, self.out_shape, flat)
        if self.kind == "linear":
            return rows[:, 0]
        if self.layout.transposed:
            rows = flip_kernel(rows.reshape((len(flat), -1) + self.layout.kernel))
        return rows.reshape(len(flat), -1)


SUM_BLOCK_BYTES = 64 << 20


def choose_points(consumer: Consumer, samples: int, count: int, rng) -> np.ndarray:
    """Sorted flat indices sample * positions + position of `count` points of a layer (all when fewer)."""
    total = samples * consumer.positions
    if count >= total:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=count, replace=False))


def find_consumers(analysis) -> list[Consumer]:
    """Every consumer of a prunable group's channels, in graph order."""
    prunable = np.zeros(len(analysis.groups), dtype=bool)
    prunable[[g.index for g in analysis.prunable_groups()]] = True
    weighted_op = set(weighted_ops())
    found = []
    for node in analysis.graph.nodes:
        if node.op not in weighted_op or not node.inputs:
            continue  # before reading any constant: reading loads it, and the model is then written anew
        cmap = analysis.maps.get(node.inputs[0].name)
        weight = const_input(node, 1)
        if cmap is None or weight is None or cmap.ids.ndim != 1:
            continue
        op_weight = weighted(node.op, node.attrs, weight.shape, node.domain)
        if op_weight is None:
            continue
        units = analysis.label[cmap.ids]
        owners = analysis.group_of[units]
        if not prunable[owners[owners >= 0]].any():
            continue
        consumer = _consumer(node, cmap, units, weight, analysis.shapes, *op_weight)
        if consumer is not None:
            found.append(consumer)
    return found


def _known(shape) -> bool:
    return bool(shape) and None not in shape


def _consumer(node, cmap, units, weight, shapes, handler, layout) -> Consumer | None:
    if layout.depthwise:
        return None  # the channels flow on to the output
    in_shape, out_shape = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    axis = layout.data_axis
    if axis < 0:  # the last axis (MatMul)
        if not _known(in_shape):
            return None
        axis += len(in_shape)
    if cmap.axis != axis or axis == 0:
        return None  # channels on another axis (they pass through a MatMul), or along the samples
    matrix = filters(handler, layout, weight)
    if not layout.kernel:  # rows per sample: the input's leading axes are the output's
        positions = handler.positions(layout, in_shape) if in_shape else 1
        return Consumer(node, node.inputs[0].name, units, np.asarray(matrix, dtype=np.float32), "linear", layout,
                        positions, handler)
    if not _known(in_shape) or not _known(out_shape):
        return None
    derived_pads = text(node.attrs.get("auto_pad", "NOTSET")) != "NOTSET" or node.attrs.get("output_shape")
    if layout.transposed and derived_pads:
        return None  # scoring has always left these out (the handler's patches could now serve them)
    per_filter = matrix.reshape((layout.out_channels, layout.in_channels // layout.groups) + layout.kernel)
    if layout.transposed:
        per_filter = flip_kernel(per_filter)
    return Consumer(node, node.inputs[0].name, units, np.ascontiguousarray(per_filter, dtype=np.float32), "conv",
                    layout, handler.positions(layout, out_shape), handler, tuple(out_shape))


def flip_kernel(values: np.ndarray) -> np.ndarray:
    """The kernel axes (the last ones) reversed. Scoring reads a transposed conv as its equivalent
    stride-1 Conv, whose kernel is flipped; keeping that order keeps the sums in their order."""
    spatial = values.ndim - 2
    return np.flip(values, axis=tuple(range(2, 2 + spatial)))


def batch_rows(consumer: Consumer, activation: np.ndarray) -> np.ndarray:
    """A linear consumer's input as [samples * rows, C]."""
    return activation.reshape(-1, activation.shape[consumer.axis])


def conv_patches(consumer: Consumer, activation: np.ndarray, samples: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The input patches under output `positions` of batch items `samples`: [n, C * kernel], C-major
    (the order of `weight.reshape(F, -1)` per group)."""
    return consumer.points(activation, samples * consumer.positions + positions)
