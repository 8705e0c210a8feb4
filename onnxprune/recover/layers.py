"""The layers recovery re-fits, seen as linear maps: output rows = feature rows @ W + b.

A layer to re-fit is a weighted op (Conv, ConvTranspose, Gemm, MatMul, ...: its handler gives a weight
layout) of the pruned model whose input side changed
(it consumes a pruned group, or it is the second factor of a factorized layer) and whose output
tensor also exists in the original model (the target). Each is wrapped in a `LinearView` that knows,
for its op: how to sample output positions, how to gather the input features behind them (im2col for
convolutions), the current weights as `[groups, features, outputs per group]`, the per-channel bias
slot, and how to write new weights back into the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..io import tensor_array
from ..ops.base import ONNX_DOMAINS, Handler, WeightLayout, weighted, weighted_ops

LAYER_OPS = weighted_ops()
# a weighted op of another domain (onnxruntime's FusedConv) may apply an activation or add a residual after its
# product, and its output is the only tensor a fit can target
FOREIGN_OUTPUT = ("an op of another domain (onnxruntime's FusedConv: its output is after a fused activation), "
                  "not the product a fit needs")


class Initializers:
    """Read and replace the initializers of a model being recovered (the model is edited in place)."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.by_name = {t.name: t for t in model.graph.initializer}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def get(self, name: str) -> np.ndarray | None:
        tensor = self.by_name.get(name)
        return None if tensor is None else tensor_array(tensor)

    def set(self, node: onnx.NodeProto, index: int, values: np.ndarray) -> None:
        """Give input `index` of `node` these values; a shared or missing initializer gets a new name."""
        name = node.input[index] if index < len(node.input) else ""
        old = self.by_name.get(name)
        dtype = helper.tensor_dtype_to_np_dtype(old.data_type) if old is not None else np.float32
        values = np.ascontiguousarray(values, dtype=dtype)
        if old is not None and self.uses.get(name, 0) == 1:
            old.CopyFrom(numpy_helper.from_array(values, name))
            return
        new_name = self._unique(f"{node.output[0]}_recovered_{index}")
        tensor = numpy_helper.from_array(values, new_name)
        self.graph.initializer.append(tensor)
        self.by_name[new_name] = self.graph.initializer[-1]
        self.uses[new_name] = 1
        if old is not None:
            self.uses[name] -= 1
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new_name

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.by_name or name in self.uses:
            i += 1
            name = f"{base}{i}"
        return name


@dataclass
class BiasSlot:
    """Where a per-output-channel offset lives: the layer's own bias, or a following Add's constant.

    `current` is the offset the layer's output tensor already includes (zeros for an Add after a MatMul,
    whose constant is added after the output we fit); `write(b)` makes the output carry offset `b`."""

    current: np.ndarray
    node: onnx.NodeProto
    index: int
    scale: float = 1.0  # Gemm's beta
    additive: bool = False  # the slot is added after the fitted tensor (MatMul -> Add)
    packed: tuple | None = None  # (handler, layout) when the bias tensor packs more (a recurrent layer's B)

    def write(self, inits: Initializers, bias: np.ndarray, shape: tuple) -> None:
        inits.set(self.node, self.index, self.values(inits, bias, shape))

    def values(self, inits: Initializers, bias: np.ndarray, shape: tuple) -> np.ndarray:
        """What the slot's initializer holds for the output to carry offset `bias`."""
        if self.packed is not None:
            handler, layout = self.packed
            name = self.node.input[self.index] if self.index < len(self.node.input) else ""
            return handler.with_bias_offset(layout, inits.get(name) if name else None, bias)
        if self.additive:
            old = inits.get(self.node.input[self.index])
            return (old.reshape(-1) + bias).reshape(old.shape)
        return (bias / self.scale).reshape(shape)


@dataclass
class LinearView:
    """A layer as `y[rows, groups, outputs] = x[rows, groups, features] @ W[groups] + b[groups]`."""

    node: onnx.NodeProto
    op: str
    groups: int
    weight: np.ndarray  # current weights as [groups, features, outputs per group]
    bias: BiasSlot | None
    offset: np.ndarray  # a fixed offset the output includes that is not fitted (Gemm with scalar C)
    out_mask: np.ndarray | None  # kept output channels of the original layer, None when all are kept
    layout: WeightLayout
    handler: Handler = field(repr=False)
    level: int = 0
    attrs: dict = field(default_factory=dict)
    product_of: tuple | None = None  # layout.product_output False: (the original's input tensor, its weight
    # matrix [groups, features, kept outputs]); the fit's target is that product, not an output tensor

    def products(self, x: np.ndarray, x_original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a layer whose output is not its product: (the product with the current weights and bias,
        the original's product), each [batch items, rows per item, outputs]."""
        def product(inputs, matrix):
            rows = self.handler.input_rows(self.layout, self.attrs, inputs, None, slice(None)).astype(np.float64)
            y = np.einsum("rgf,gfo->rgo", rows, matrix).reshape(len(rows), -1)
            return (y + self._bias()).reshape(-1, self.handler.positions(self.layout, inputs.shape), y.shape[-1])

        return product(x, self.weight), product(x_original, self.product_of[1])

    def _bias(self) -> np.ndarray:
        return 0.0 if self.bias is None else self.bias.current

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def input(self) -> str:
        return self.node.input[0]

    @property
    def output(self) -> str:
        return self.node.output[0]

    # ---- rows: which output positions of a batch are used
    def row_count(self, y_shape: tuple) -> int:
        return self.handler.rows(self.layout, y_shape)

    def outputs(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Output values at `rows`: [R, channels]."""
        return self.handler.output_rows(self.layout, y, rows)

    def features(self, x: np.ndarray, y_shape: tuple, rows: np.ndarray) -> np.ndarray:
        """Input features behind the outputs at `rows`: [R, groups, features]."""
        return self.handler.input_rows(self.layout, self.attrs, x, y_shape, rows)

    # ---- writing
    def write(self, inits: Initializers, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
        """Store fitted `weight` [groups, features, outputs per group] and `bias` [channels] (None: keep)."""
        if weight is not None:
            inits.set(self.node, 1, self.weight_values(weight))
        if bias is not None and self.bias is not None:
            self.bias.write(inits, bias, self.bias_shape(bias))

    def weight_values(self, weight: np.ndarray) -> np.ndarray:
        """The op's weight tensor for `weight` as [groups, features, outputs per group]."""
        return self.handler.from_matrix(self.layout, weight / self.layout.scale)

    def bias_shape(self, bias: np.ndarray) -> tuple:
        return self.attrs.get("bias_shape", bias.shape)


# ---------------------------------------------------------------- finding the layers


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def input_signature(op: str, weight_shape: tuple, attrs: dict) -> tuple | None:
    """What a layer reads per output (see WeightLayout.input_signature). It differs from the
    original's when input channels were pruned or the layer was factorized."""
    found = weighted(op, attrs, weight_shape) if weight_shape else None
    return None if found is None else found[1].input_signature()


def find_layers(original: onnx.ModelProto, model: onnx.ModelProto, original_shapes: dict,
                output_masks: dict) -> tuple[list[LinearView], list[dict]]:
    """Views of the layers of `model` to re-fit, with their dependency level, and the skipped ones."""
    inits = Initializers(model)
    original_producer = {o: n for n in original.graph.node for o in n.output}
    original_weights = {t.name: tuple(t.dims) for t in original.graph.initializer}
    consumers = node_consumers(model)
    original_inits = {t.name: t for t in original.graph.initializer}

    def original_values(name: str) -> np.ndarray | None:
        return tensor_array(original_inits[name]) if name in original_inits else None

    tied = {n.output[0]: n.input[0] for n in model.graph.node  # a weight read transposed by one node, as it
            if n.op_type == "Transpose" and n.input and inits.uses.get(n.input[0], 0) > 1}  # is by another
    views, skipped = [], []
    for node in model.graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in tied:
            skipped.append({"name": node.name or node.output[0], "op": node.op_type, "status": "skipped",
                            "reason": f"its weight is '{tied[node.input[1]]}' transposed, which another node reads "
                                      "too: a fit of this one alone would store it twice"})
        elif node.op_type in LAYER_OPS:
            view = _candidate(node, original_producer.get(node.output[0]), inits, original_weights, original_shapes,
                              output_masks, consumers, skipped, original_values)
            if view is not None:
                views.append(view)
    level_of = tensor_levels(model, {view.output for view in views})
    for view in views:
        view.level = level_of[view.output] - 1
    return views, skipped


def tensor_levels(model: onnx.ModelProto, fitted: set[str]) -> dict[str, int]:
    """Each tensor's level: at most how many layers to re-fit (by output name, `fitted`) lie upstream of it,
    the layer producing it included; a layer's own level is its output's minus one."""
    level_of: dict[str, int] = {}
    for node in model.graph.node:
        level = max((level_of.get(t, 0) for t in node.input), default=0)
        for name in node.output:
            level_of[name] = level + (node.output[0] in fitted)
    return level_of


def _candidate(node, before, inits, original_weights, original_shapes, output_masks, consumers, skipped,
               original_values):
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if before is None or weight is None or before.op_type not in LAYER_OPS or len(before.input) < 2:
        return None
    attrs, before_attrs = _attrs(node), _attrs(before)
    before_shape = original_weights.get(before.input[1]) or original_shapes.get(before.input[1])
    signature = input_signature(node.op_type, weight.shape, attrs)
    if signature is None or signature == input_signature(before.op_type, tuple(before_shape or ()), before_attrs):
        return None
    name = node.name or node.output[0]
    if node.domain not in ONNX_DOMAINS:
        skipped.append({"name": name, "op": node.op_type, "status": "skipped", "reason": FOREIGN_OUTPUT})
        return None
    handler, layout = weighted(node.op_type, attrs, weight.shape)
    if not layout.product_output:
        return _product_view(node, before, inits, consumers, output_masks.get(node.output[0]), handler, layout,
                             original_values, skipped)
    view = layer_view(node, inits, consumers, output_masks.get(node.output[0]))
    if isinstance(view, str):
        skipped.append({"name": name, "op": node.op_type, "status": "skipped", "reason": view})
        return None
    return view


def _product_view(node, before, inits, consumers, out_mask, handler, layout, original_values, skipped):
    """The view of a layer whose output is not its product (a recurrent layer): the target is the original's
    product, computed from the original's input and weights (its kept outputs)."""
    original = original_values(before.input[1])
    view = layer_view(node, inits, consumers)
    if original is None or isinstance(view, str):
        reason = view if isinstance(view, str) else "the original's weight is not a constant"
        skipped.append({"name": node.name or node.output[0], "op": node.op_type, "status": "skipped", "reason": reason})
        return None
    _, original_layout = weighted(before.op_type, _attrs(before), original.shape)
    matrix = handler.to_matrix(original_layout, original.astype(np.float64)) * original_layout.scale
    if out_mask is not None:
        matrix = matrix[..., handler.product_mask(layout, out_mask)]
    view.product_of = (before.input[0], matrix)
    return view


def layer_view(node, inits: Initializers, consumers: dict, out_mask: np.ndarray | None = None) -> LinearView | str:
    """The view of a weighted node with a constant weight, or the reason it cannot be re-fitted.
    `consumers`: the nodes reading each tensor (for a MatMul's bias in the Add after it)."""
    weight = inits.get(node.input[1])
    if weight.dtype.kind != "f":
        return f"weights are {weight.dtype}, not floating point"
    if inits.uses.get(node.input[1], 0) > 1:
        return f"its weight '{node.input[1]}' is shared with another node: a fit of this one alone would store it twice"
    attrs = _attrs(node)
    handler, layout = weighted(node.op_type, attrs, weight.shape)
    bias, offset = _bias_slot(node, inits, consumers, attrs, handler, layout)
    if bias is False:
        return "Gemm bias C is not per output channel"
    matrix = handler.to_matrix(layout, weight.astype(np.float64)) * layout.scale
    view = LinearView(node, node.op_type, layout.groups, matrix, bias, offset, out_mask, layout, handler, attrs=attrs)
    channels = view.weight.shape[0] * view.weight.shape[2]
    if out_mask is not None and int(out_mask.sum()) != channels:
        return f"output channel mask ({int(out_mask.sum())} kept) does not match the layer ({channels})"
    return view


def node_consumers(model: onnx.ModelProto) -> dict[str, list]:
    """The nodes reading each tensor."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _bias_slot(node, inits, consumers, attrs, handler, layout):
    """(BiasSlot or None, fixed offset); (False, None) when the bias cannot be handled."""
    channels, index = layout.out_channels, layout.bias_input
    if index is not None:
        scale = float(layout.bias_scale)
        present = len(node.input) > index and node.input[index] != ""
        values = inits.get(node.input[index]) if present else None
        if present and values is None:
            return False, None
        if not present and not layout.product_output:  # a packed bias (B) the handler writes whole
            return BiasSlot(np.zeros(channels), node, index, packed=(handler, layout)), np.zeros(1)
        if not present:
            attrs["bias_shape"] = (channels,)
            return (BiasSlot(np.zeros(channels), node, index, scale) if scale else None), np.zeros(1)
        packed = handler.bias_offset(layout, values)
        if packed is not None:
            return BiasSlot(packed.astype(np.float64), node, index, packed=(handler, layout)), np.zeros(1)
        if values.size == channels and values.shape[-1] == channels:
            attrs["bias_shape"] = values.shape
            return BiasSlot(values.reshape(-1).astype(np.float64) * scale, node, index, scale), np.zeros(1)
        if values.size == 1:
            return None, values.reshape(1).astype(np.float64) * scale
        return False, None
    # no bias input (MatMul): an Add of a per-channel constant right after it, used by nobody else, takes the offset
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = 1 if add.input[0] == node.output[0] else 0
        values = inits.get(add.input[other])
        if values is not None and values.size == channels and values.shape[-1] == channels:
            return BiasSlot(np.zeros(channels), add, other, additive=True), np.zeros(1)
    return None, np.zeros(1)
