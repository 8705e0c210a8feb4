"""The handler registry and the helpers handlers share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

_REGISTRY: dict[str, "Handler"] = {}
ONNX_DOMAINS = ("", "ai.onnx", None)  # the default domain (graphsurgeon: None)
MICROSOFT = "com.microsoft"  # onnxruntime's contrib ops (its blocked layout's, com.microsoft.nchwc, are not)

# Opt-in handler behaviours (`AnalysisContext.allows`):
HIDDEN = "hidden"  # the hidden size: embedding tables are sources, LayerNorms pass it on, inexactly (--hidden)


@dataclass(frozen=True)
class WeightLayout:
    """How the constant weight of a weighted op (Conv, Gemm, ...) maps input channels to output channels.

    IR-neutral: built by the op's handler from the op type, its attributes and the weight's shape, so
    graphsurgeon nodes and onnx.NodeProto ask the same question. Axes are axes of the weight; each
    group reads `in_channels // groups` inputs and writes `out_channels // groups` outputs.
    """

    op: str
    shape: tuple  # the weight's shape
    in_channels: int
    out_channels: int
    in_axis: int  # weight axis of the input channels
    out_axis: int  # weight axis of the output channels
    groups: int = 1
    kernel: tuple = ()  # spatial kernel shape (convolutions)
    transposed: bool = False  # the op scatters each input over a window of outputs (ConvTranspose)
    scale: float = 1.0  # factor the op applies to the weight (Gemm's alpha); not in `to_matrix`
    data_axis: int = 1  # axis of the op's input tensor that carries the input channels (-1: the last)
    bias_input: int | None = None  # the op's input holding a per-output-channel bias, if it has one
    bias_scale: float = 1.0  # factor the op applies to that bias (Gemm's beta)
    product_output: bool = True  # the op's output 0 is the rows of input x weight (+ bias); False: the
    # product is internal (a recurrent layer's gate inputs), recovery computes it from the input

    @property
    def depthwise(self) -> bool:
        """One input channel per group: the op passes channels on instead of consuming them."""
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel, dtype=np.int64))

    @property
    def features(self) -> int:
        """Input features per output channel: input channels of its group times the kernel."""
        return self.in_channels // self.groups * self.kernel_size

    def input_signature(self) -> tuple:
        """What each output reads: the weight shape without the output axis. Not the groups: a Conv that lost
        whole groups, or a depthwise Conv that lost channels, computes its kept outputs from what they read
        before (so recovery leaves it; re-fitting them too changed no model's accuracy beyond the seeds' spread).
        A depthwise ConvTranspose keeps its input channels in this shape, so it is re-fitted still."""
        reads = tuple(d for axis, d in enumerate(self.shape) if axis != self.out_axis % len(self.shape))
        return self.op, reads


class Handler:
    """Channel semantics of one op family. Subclasses override what applies to them.

    A weighted handler (Conv, Gemm, ...) also answers `weight_layout` and the methods below it; they
    work from an op type, an attribute dict and the weight (or its shape), whatever the IR.
    """

    multi_axis = False  # accepts channel maps split across several axes (see graph.ChannelMap)
    domains: tuple[str, ...] = ()  # domains besides ONNX's whose nodes of its op types it reads

    def propagate(self, node: gs.Node, ctx) -> None:
        """Read input channel maps from `ctx`; set output maps, join, block or create sources."""
        raise NotImplementedError

    def rewrite(self, node: gs.Node, rw) -> None:
        """Slice the node for the kept channels: `rw.mask(tensor)` is None or a keep mask."""

    def filter_weights(self, node: gs.Node) -> np.ndarray | None:
        """For a source: its weights as [output channels, fan-in], output-major."""
        return None

    def hidden_width(self, node: gs.Node, ctx) -> int | None:
        """The residual width the hidden-size option (--hidden) lets through this node (a norm over the
        last axis) or makes it the source of (an embedding table); None when it does neither."""
        return None

    def channel_scales(self, node: gs.Node) -> np.ndarray | None:
        """For a normalisation layer: its per-channel scale (BN gamma), for the `bn` scorer."""
        return None

    def weight_channels(self, node: gs.Node, ctx) -> tuple[gs.Constant, dict[int, np.ndarray | None]] | None:
        """For a node reading a constant weight: the weight and, per weight axis the cut may slice, the
        channel ids at that axis's positions (None: this node cannot slice it). Nodes sharing one weight
        must slice it alike, or the cut stores it twice (graph.analysis joins or blocks them; a node whose
        handler does not answer counts as slicing no axis). None when the node has no such weight."""
        return None

    def constant_weight(self, node: gs.Node) -> tuple[gs.Constant, WeightLayout] | None:
        """A weighted node's constant weight (input 1) and its layout, or None."""
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(weight, gs.Constant):
            return None
        layout = self.weight_layout(node.op, node.attrs, tuple(weight.shape))
        return None if layout is None else (weight, layout)

    # ---- weighted ops
    def weight_layout(self, op: str, attrs: dict, weight_shape: tuple) -> WeightLayout | None:
        """The layout of a weight of this shape, or None when the op has no such weight."""
        return None

    def to_matrix(self, layout: WeightLayout, weight: np.ndarray) -> np.ndarray:
        """The weight as [groups, features, outputs per group], features input-channel-major then kernel."""
        raise NotImplementedError

    def from_matrix(self, layout: WeightLayout, matrix: np.ndarray) -> np.ndarray:
        """Inverse of `to_matrix`: a weight of `layout.shape`."""
        raise NotImplementedError

    def input_factors(self, layout: WeightLayout, factors: np.ndarray) -> np.ndarray:
        """`factors` (one per input channel) shaped to broadcast against the weight."""
        raise NotImplementedError

    def input_rows(self, layout: WeightLayout, attrs: dict, x: np.ndarray, out_shape: tuple,
                   rows: np.ndarray) -> np.ndarray:
        """The input features behind output rows `rows` (flat indices into the output positions of
        `out_shape`, see `rows`), as [R, groups, features] in the order of `to_matrix`."""
        raise NotImplementedError

    def output_rows(self, layout: WeightLayout, y: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        """The output at `rows` (flat indices into the output positions, as in `input_rows`, or a slice of
        them) as [R, output channels]."""
        raise NotImplementedError

    def rows(self, layout: WeightLayout, out_shape: tuple) -> int:
        """How many output rows (positions the weight is applied at) an output of `out_shape` has."""
        raise NotImplementedError

    def positions(self, layout: WeightLayout, out_shape: tuple) -> int:
        """Output rows per item of the leading (batch) axis."""
        raise NotImplementedError

    def macs(self, op: str, attrs: dict, in_shape, weight_shape, out_shape) -> int | None:
        """Multiply-accumulates at these shapes (any may be None: unknown); None when they do not say."""
        return None

    def optional_macs(self, op: str, given: tuple[bool, ...], out_shape) -> int:
        """Multiply-accumulates beyond `macs` that depend on which inputs the node has (`given`: per input
        position, whether it is there; `out_shape` may be None): 0 unless the op has such an input."""
        return 0

    def attribute_problem(self, op: str, attrs: dict, in_shapes: list, out_shapes: list) -> str | None:
        """What makes a node of this op unusable although the ONNX checker lets it through (a window,
        stride or group of 0, an empty output), as a phrase, or None. `attrs` as in `weight_layout`;
        the shapes are those of the node's inputs and outputs (None, or tuples with None for unknown dims)."""
        return None

    def bias_offset(self, layout: WeightLayout, values: np.ndarray) -> np.ndarray | None:
        """For a bias input that packs more than one offset per output (a recurrent layer's B): the offset
        its outputs carry, [out_channels]; None when the bias input holds just that offset."""
        return None

    def with_bias_offset(self, layout: WeightLayout, values: np.ndarray | None, offset: np.ndarray) -> np.ndarray:
        """The packed bias tensor (`values`, None: absent) changed so that its outputs carry `offset`."""
        raise NotImplementedError

    def product_mask(self, layout: WeightLayout, keep: np.ndarray) -> np.ndarray:
        """`product_output` False: the kept columns of the product, given the kept channels of output 0."""
        return keep

    def narrowed(self, layout: WeightLayout, weight: np.ndarray,
                 keep: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """For the op to read only the input channels of `keep` (a bool mask, one per input channel) while its
        input keeps them all: (the channels of the input to gather along `layout.data_axis`, the weight
        sliced to them), or (None, the weight with the other channels' inputs zeroed) when the op cannot read
        a narrower input (a grouped conv: every block reads the same width)."""
        if layout.groups > 1:
            return None, zero_inputs(self, layout, weight, keep)
        indices = np.flatnonzero(keep).astype(np.int64)
        return indices, np.ascontiguousarray(np.take(weight, indices, axis=layout.in_axis))

    def timing_sides(self, node: gs.Node) -> tuple[int, int, int, str, int] | None:
        """For the latency model, when the node can be timed alone at other channel counts (its rewrite
        slicing it): (axis of input 0 carrying the input channels, input channels, output channels, kind,
        blocks), kind "dense" (time grows with inputs x outputs), "depthwise" (one channel in per channel
        out: output channels follow the input's) or "recurrent" (inputs x units and units x units), blocks
        the equal blocks of each side whose j-th channels are kept or removed together (a grouped conv's
        groups; else 1); None when it cannot be timed alone. This default reads the weight layout of input
        1 when it is a constant."""
        weight = const_input(node, 1)
        layout = self.weight_layout(node.op, node.attrs, weight.shape) if weight is not None else None
        if layout is None or layout.transposed or len(layout.shape) < 2:
            return None
        if layout.depthwise and layout.out_channels == layout.in_channels:
            return layout.data_axis, layout.in_channels, layout.out_channels, "depthwise", 1
        if layout.depthwise:
            return None
        return layout.data_axis, layout.in_channels, layout.out_channels, "dense", layout.groups

    def channel_padded(self, node: gs.Node) -> bool:
        """For the latency model: whether onnxruntime's CPU optimizer runs the node in its blocked channel
        layout (NCHWc), which pads its channels up to the machine's block (`latency_model.channel_block`)."""
        return False

    def per_channel(self, node: gs.Node) -> bool:
        """For the latency model: whether the node maps each channel of its channel-carrying inputs to the same
        channel of its output 0, element by element or per channel (an activation, arithmetic with a constant
        or between such tensors, BatchNormalization), with its constants sliced by `rewrite`: then it can be
        timed with the layer whose output it follows (`latency_model.chain_after`)."""
        return False

    def cost_parts(self, node: gs.Node) -> list[tuple[float, gs.Tensor, gs.Tensor]] | None:
        """For a source whose MACs do not all scale with its input and output channels: (share of its
        MACs, the tensor whose kept fraction scales the share on the input side, likewise the output
        side) per part; None: one part, input 0 and output 0."""
        return None


def filters(handler: Handler, layout: WeightLayout, weight: np.ndarray) -> np.ndarray:
    """The weight as [outputs, features]: row o is what output channel o reads (grouped: its group's)."""
    return handler.to_matrix(layout, weight).transpose(0, 2, 1).reshape(layout.out_channels, -1)


def scale_inputs(handler: Handler, layout: WeightLayout, weight: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """The weight with input channel c multiplied by `factors[c]`, in the weight's dtype."""
    return (weight * handler.input_factors(layout, factors)).astype(weight.dtype)


def zero_inputs(handler: Handler, layout: WeightLayout, weight: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The weight with the input channels outside `keep` (a bool mask) set to zero."""
    return np.where(handler.input_factors(layout, keep), weight, 0).astype(weight.dtype)


def weighted_ops() -> tuple[str, ...]:
    """The op types whose handler gives a weight layout."""
    return tuple(op for op, handler in sorted(_REGISTRY.items())
                 if type(handler).weight_layout is not Handler.weight_layout)


def weighted(op: str, attrs: dict, weight_shape, domain: str | None = "") -> tuple[Handler, WeightLayout] | None:
    """(handler, layout) of a weighted op with a weight of this shape, else None."""
    handler = handler_for(op, domain)
    if handler is None or weight_shape is None:
        return None
    layout = handler.weight_layout(op, attrs, tuple(int(d) for d in weight_shape))
    return None if layout is None else (handler, layout)


def register(*op_types: str):
    def decorate(cls):
        instance = cls()
        for op in op_types:
            _REGISTRY[op] = instance
        return cls

    return decorate


def handler_for(op_type: str, domain: str | None = "") -> Handler | None:
    """The handler of a node of this op type and domain: an op of another domain than ONNX's has its own
    semantics whatever its name (onnxruntime's blocked-layout Conv holds its filters in blocks and may carry a
    fused activation), so only handlers that say they read that domain (`Handler.domains`) answer for it."""
    handler = _REGISTRY.get(op_type)
    if handler is None or not (domain in ONNX_DOMAINS or domain in handler.domains):
        return None
    return handler


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------- helpers


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def onnx_op(node: gs.Node, *ops: str) -> bool:
    """`node` is one of ONNX's `ops` (not an op of another domain that shares its name)."""
    return node.op in ops and node.domain in ONNX_DOMAINS


def gather_kept(node: gs.Node, index: int, axis: int, mask: np.ndarray, rw) -> None:
    """`node` reads only the kept positions (`mask`) of its untracked input `index` at `axis`: a Gather of them,
    exact whatever that input holds when its size there is fixed at any input size (the caller's check)."""
    node.inputs[index] = rw.add_node("Gather", [node.inputs[index], np.flatnonzero(mask).astype(np.int64)], axis=axis)


def const_input(node: gs.Node, index: int) -> np.ndarray | None:
    """Value of input `index` when it is a constant, else None (also when absent)."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def text(value) -> str:
    """A string attribute as str (onnx.helper gives bytes, graphsurgeon str)."""
    return value.decode() if isinstance(value, bytes) else value


def weight_axis_ids(cmap, axis: int, size: int, groups: int = 1) -> np.ndarray | None:
    """The channel ids indexing a weight axis of `size` that a tensor's channels on `axis` slice (`cmap`
    its map): all of them, or, for a grouped op whose blocks are joined, the first block's (a block of one
    channel is a depthwise conv's input axis, which is never sliced); None when the channels are not
    tracked there."""
    if cmap is None or cmap.ids.ndim != 1 or cmap.axis != axis:
        return None
    if len(cmap.ids) == size:
        return cmap.ids
    if size > 1 and len(cmap.ids) == size * groups:
        return cmap.ids.reshape(groups, size)[0]
    return None


def known_shape(shapes: dict, tensor: gs.Tensor) -> tuple | None:
    """A tensor's shape (a constant's own, else the analysed one in `shapes`) when every dim is known."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    shape = shapes.get(tensor.name)
    return None if shape is None or any(d is None for d in shape) else shape


def has_input(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index].name != ""


def pass_through(node: gs.Node, ctx, input_index: int = 0, outputs=(0,)) -> None:
    """Outputs carry the channels of one input unchanged (activations, Identity, pooling, ...)."""
    cmap = ctx.channels(node.inputs[input_index])
    if cmap is None:
        return
    for o in outputs:
        if o < len(node.outputs) and node.outputs[o].name:
            ctx.set(node.outputs[o], cmap)


def join_rows(ctx, ids: np.ndarray) -> None:
    """Make each row of `ids` [units, channels per unit] one unit (an attention head)."""
    ctx.join(np.repeat(ids[:, 0], ids.shape[1] - 1), ids[:, 1:])


def window_problem(attrs: dict, in_shape, out_shape) -> str | None:
    """`Handler.attribute_problem` of a sliding-window op (Conv, ConvTranspose, pooling): a kernel,
    stride or dilation below 1, a negative pad, or an output with no positions."""
    for name in ("kernel_shape", "strides", "dilations"):
        values = list(attrs.get(name) or [])
        if any(v < 1 for v in values):
            return f"{name} {values} must be positive"
    pads = list(attrs.get("pads") or [])
    if any(p < 0 for p in pads):
        return f"pads {pads} must not be negative"
    spatial = tuple(out_shape or ())[2:]
    if any(d is not None and d < 1 for d in spatial):
        window = "x".join(str(k) for k in attrs.get("kernel_shape") or []) or "its"
        size = "x".join(str(d) for d in tuple(in_shape or ())[2:]) or "?"
        return (f"its output would be empty ({'x'.join(str(d) for d in spatial)}): a {window} window (pads "
                f"{pads or 0}) does not fit its {size} input; a stride or kernel before it, or --input-shape, is wrong")
    return None


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
