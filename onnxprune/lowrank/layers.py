"""Which layers can be factorized, seen as one linear map per output position.

Every candidate is `y = x @ W` with W [in_features, out_features], applied `positions` times at batch 1:

- Conv (group 1): x is the input patch of one output pixel (input channels x kernel window, in that
  order, as im2col lays it out) and W the weight reshaped [c_out, c_in * k...] and transposed;
  positions = output pixels.
- Gemm: W is alpha * B (or alpha * B^T with transB); positions = rows of the output.
- MatMul with a constant 2-D right operand: W itself; positions = all leading dims of the output.

So a layer's MACs are positions * in * out, and a factorization at rank r with j input subspaces costs
positions * r * (in + j * out). Layers that cannot be factorized carry the reason instead.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ops.base import MICROSOFT, ONNX_DOMAINS, Handler, WeightLayout, weighted

SUBSPACES = (1, 2, 4, 8)  # ALDS input-channel subspace counts tried for a k x k Conv (those dividing c_in)


@dataclass
class Layer:
    name: str
    op: str
    input_name: str = ""
    weight: np.ndarray | None = None  # [in_features, out_features], float64
    weight_dtype: np.dtype | None = None
    positions: int = 0
    reason: str = ""  # why the layer is not factorized; empty when it is a candidate
    kernel: tuple[int, ...] = ()  # Conv kernel shape
    channels_in: int = 0  # Conv input channels (the subspaces split them)
    conv_attrs: dict = field(default_factory=dict)  # strides, pads, dilations, auto_pad of a Conv
    input_transposed: bool = False  # Gemm with transA: features are the rows of A
    subspace_options: tuple[int, ...] = (1,)
    layout: WeightLayout | None = None
    handler: Handler | None = field(default=None, repr=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def full_rank(self, subspaces: int = 1) -> int:
        """Largest rank of one subspace's block, the most a factorization can keep."""
        return min(self.in_features // subspaces, self.out_features)

    def weight_params(self, rank: int | None = None, subspaces: int = 1) -> int:
        """Weight entries dense (rank None) or factorized at `rank` with `subspaces` input subspaces."""
        if rank is None:
            return self.in_features * self.out_features
        return rank * (self.in_features + subspaces * self.out_features)

    def macs(self, rank: int | None = None, subspaces: int = 1) -> int:
        return self.positions * self.weight_params(rank, subspaces)

    def break_even_rank(self, subspaces: int = 1) -> int:
        """Largest rank whose factorization still has fewer MACs and params than the dense layer."""
        return (self.in_features * self.out_features - 1) // (self.in_features + subspaces * self.out_features)


def layer_name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def find_layers(graph: gs.Graph, shapes: dict[str, tuple], exclude=(), factorizing: bool = True) -> list[Layer]:
    """Every Conv, Gemm and MatMul of `graph`, in graph order, as a candidate or with its skip reason
    (`factorizing`: also a layer no rank makes cheaper; the sparsity stage takes those too, and onnxruntime's
    FusedConvs, which `--no-simplify` leaves, each as the Conv it applies before its residual and activation)."""
    layers = []
    nodes = [node for node in graph.nodes if node.op in ("Conv", "Gemm", "MatMul") and node.domain in ONNX_DOMAINS
             or not factorizing and node.op == "FusedConv" and node.domain == MICROSOFT]
    uses = Counter(layer_name(node) for node in nodes)
    for node in nodes:
        layer = _describe(node, shapes)
        if uses[layer.name] > 1:  # plans and reports name layers: an ambiguous name cannot be one
            layer.reason = f"{uses[layer.name]} layers share the node name {layer.name!r}"
        pattern = next((p for p in exclude if fnmatch.fnmatchcase(layer.name, p)), None)
        if pattern is not None and not layer.reason:
            layer.reason = f"excluded by --exclude {pattern}"
        if factorizing and not layer.reason and layer.break_even_rank(1) < 1:
            layer.reason = f"{layer.in_features}x{layer.out_features} map: no rank lowers its MACs and params"
        layers.append(layer)
    return layers


def _describe(node: gs.Node, shapes) -> Layer:
    op = "Conv" if node.op == "FusedConv" else node.op  # its input statistics are the Conv's patches
    layer = Layer(layer_name(node), op, node.inputs[0].name if node.inputs else "")
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant):
        layer.reason = ("no constant weight (e.g. attention scores)" if node.op == "MatMul"
                        else "weight is not a constant")
        return layer
    if len(weight.outputs) > 1:
        layer.reason = (f"its weight '{weight.name}' is shared with another node: changing it for this one "
                        "would store it twice")
        return layer
    values = weight.values
    if not np.issubdtype(values.dtype, np.floating):
        layer.reason = f"weight of type {values.dtype} (quantized?) is not factorized"
        return layer
    out_shape = shapes.get(node.outputs[0].name)
    if out_shape is None or any(d is None for d in out_shape):
        layer.reason = "output shape unknown at the analysed input shapes"
        return layer
    layer.weight_dtype = values.dtype
    handler, layout = weighted(node.op, node.attrs, values.shape, node.domain) or (None, None)
    if layout is None:  # a weight of another rank than the op takes
        layer.reason = "Gemm weight is not 2-D" if node.op == "Gemm" else "weight is not a constant 2-D right operand"
        return layer
    layer.layout, layer.handler = layout, handler
    describe = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}[op]
    describe(node, values, out_shape, layer, handler, layout)
    return layer


def _matrix(handler, layout, values: np.ndarray) -> np.ndarray:
    """The weight as [in_features, out_features], float64, with the op's scale (Gemm alpha) applied."""
    return handler.to_matrix(layout, values)[0].astype(np.float64) * layout.scale


def _conv(node: gs.Node, values: np.ndarray, out_shape, layer: Layer, handler, layout) -> None:
    c_in = layout.in_channels
    if layout.groups != 1:
        layer.reason = ("depthwise conv: a channel decomposition cannot lower its cost" if layout.depthwise
                        else f"grouped conv (group={layout.groups}) is not factorized")
        return
    layer.weight = _matrix(handler, layout, values)
    layer.positions = handler.positions(layout, out_shape)
    layer.kernel = layout.kernel
    layer.channels_in = c_in
    layer.conv_attrs = {k: node.attrs[k] for k in ("strides", "pads", "dilations", "auto_pad") if k in node.attrs}
    if layout.kernel_size > 1:  # ALDS's case; on a 1x1 conv subspaces save little for one more SVD each
        layer.subspace_options = tuple(j for j in SUBSPACES if c_in % j == 0 and c_in // j >= 2) or (1,)


def _gemm(node: gs.Node, values: np.ndarray, out_shape, layer: Layer, handler, layout) -> None:
    layer.weight = _matrix(handler, layout, values)
    layer.positions = handler.rows(layout, out_shape)
    layer.input_transposed = layout.data_axis == 0


def _matmul(node: gs.Node, values: np.ndarray, out_shape, layer: Layer, handler, layout) -> None:
    if isinstance(node.inputs[0], gs.Constant):
        layer.reason = "weight is not a constant 2-D right operand"
        return
    layer.weight = _matrix(handler, layout, values)
    layer.positions = handler.rows(layout, out_shape)
