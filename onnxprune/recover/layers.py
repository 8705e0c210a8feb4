"""The layers recovery re-fits, seen as linear maps: output rows = feature rows @ W + b.

A layer to re-fit is a Conv, ConvTranspose, Gemm or MatMul of the pruned model whose input side changed
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

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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
        return None if tensor is None else numpy_helper.to_array(tensor)

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

    def write(self, inits: Initializers, bias: np.ndarray, shape: tuple) -> None:
        if self.additive:
            old = inits.get(self.node.input[self.index])
            inits.set(self.node, self.index, (old.reshape(-1) + bias).reshape(old.shape))
        else:
            inits.set(self.node, self.index, (bias / self.scale).reshape(shape))


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
    level: int = 0
    attrs: dict = field(default_factory=dict)

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
        if self.op in ("Conv", "ConvTranspose"):
            return int(y_shape[0] * np.prod(y_shape[2:], dtype=np.int64))
        if self.op == "Gemm":
            return int(y_shape[0])
        return int(np.prod(y_shape[:-1], dtype=np.int64))

    def outputs(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Output values at `rows`: [R, channels]."""
        if self.op in ("Conv", "ConvTranspose"):
            y = np.moveaxis(y, 1, -1)
        return y.reshape(-1, y.shape[-1])[rows]

    def features(self, x: np.ndarray, y_shape: tuple, rows: np.ndarray) -> np.ndarray:
        """Input features behind the outputs at `rows`: [R, groups, features]."""
        if self.op in ("Conv", "ConvTranspose"):
            patches = conv_patches(x, y_shape, rows, self.node, self.op, self.weight_shape)
            r, c, k = patches.shape
            return patches.reshape(r, self.groups, (c // self.groups) * k)
        if self.op == "Gemm" and self.attrs.get("transA", 0):
            x = x.T
        return x.reshape(-1, x.shape[-1])[rows][:, None, :]

    @property
    def weight_shape(self) -> tuple:
        return self.attrs["weight_shape"]

    # ---- writing
    def write(self, inits: Initializers, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
        """Store fitted `weight` [groups, features, outputs per group] and `bias` [channels] (None: keep)."""
        if weight is not None:
            inits.set(self.node, 1, to_layer_layout(self.op, weight, self.weight_shape, self.attrs))
        if bias is not None and self.bias is not None:
            self.bias.write(inits, bias, self.attrs.get("bias_shape", bias.shape))


def to_view_layout(op: str, w: np.ndarray, groups: int, attrs: dict) -> np.ndarray:
    """Layer weights -> [groups, features, outputs per group] (features ordered like `features`)."""
    if op == "Conv":  # [M, C/g, k...]
        m = w.shape[0]
        return w.reshape(groups, m // groups, -1).transpose(0, 2, 1)
    if op == "ConvTranspose":  # [C, M/g, k...]
        c, mg = w.shape[:2]
        return w.reshape(groups, c // groups, mg, -1).transpose(0, 1, 3, 2).reshape(groups, -1, mg)
    if op == "Gemm":
        w = w.T if attrs.get("transB", 0) else w
        return (w * attrs.get("alpha", 1.0))[None]
    return w[None]  # MatMul [K, N]


def to_layer_layout(op: str, w: np.ndarray, shape: tuple, attrs: dict) -> np.ndarray:
    groups = w.shape[0]
    if op == "Conv":
        return w.transpose(0, 2, 1).reshape(shape)
    if op == "ConvTranspose":
        c, mg = shape[:2]
        return w.reshape(groups, c // groups, -1, mg).transpose(0, 1, 3, 2).reshape(shape)
    if op == "Gemm":
        w = w[0] / attrs.get("alpha", 1.0)
        return w.T if attrs.get("transB", 0) else w
    return w[0]


# ---------------------------------------------------------------- convolution patches (im2col)


def _ints(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.type == onnx.AttributeProto.INTS else (a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i)
    return default


def pads_begin(node, op, in_dims, out_dims, kernel, strides, dilations) -> list[int]:
    spatial = len(kernel)
    auto_pad = _ints(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * spatial
    if auto_pad == "NOTSET" and (op == "Conv" or _ints(node, "output_shape", None) is None):
        return list(_ints(node, "pads", [0] * 2 * spatial)[:spatial])
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if op == "Conv":
        total = [max(0, (o - 1) * s + r - i) for o, s, r, i in zip(out_dims, strides, reach, in_dims)]
    else:
        extra = _ints(node, "output_padding", [0] * spatial)
        total = [s * (i - 1) + e + r - o for s, i, e, r, o in zip(strides, in_dims, extra, reach, out_dims)]
    if auto_pad == "SAME_UPPER":
        return [t // 2 for t in total]
    return [t - t // 2 for t in total]


def conv_patches(x: np.ndarray, y_shape: tuple, rows: np.ndarray, node, op: str, weight_shape: tuple) -> np.ndarray:
    """For output positions `rows` (flat indices into [N, *spatial_out]): the input values each output
    reads, as [R, input channels, kernel elements]; zero where a kernel tap falls in the padding."""
    kernel = list(weight_shape[2:])
    spatial = len(kernel)
    strides = _ints(node, "strides", [1] * spatial)
    dilations = _ints(node, "dilations", [1] * spatial)
    in_dims, out_dims = list(x.shape[2:]), list(y_shape[2:])
    begin = pads_begin(node, op, in_dims, out_dims, kernel, strides, dilations)
    coords = np.unravel_index(rows, [y_shape[0], *out_dims])
    count = len(rows)
    index, valid = [], np.ones([count] + kernel, dtype=bool)
    for d in range(spatial):
        taps = np.arange(kernel[d]) * dilations[d]
        out = coords[1 + d][:, None]
        if op == "Conv":
            pos = out * strides[d] - begin[d] + taps
            ok = (pos >= 0) & (pos < in_dims[d])
        else:  # ConvTranspose: output o reads input i where i * stride - pad + tap = o
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


# ---------------------------------------------------------------- finding the layers


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def input_signature(op: str, weight_shape: tuple, attrs: dict) -> tuple | None:
    """What a layer reads per output: its weight shape without the output-channel axis, and its groups.
    It differs from the original's when input channels were pruned or the layer was factorized."""
    if not weight_shape:
        return None
    groups = int(attrs.get("group", 1))
    if op == "Conv":
        return op, tuple(weight_shape[1:]), groups
    if op == "ConvTranspose":
        return op, (weight_shape[0], *weight_shape[2:]), groups
    if op == "Gemm":
        return op, (weight_shape[1] if attrs.get("transB", 0) else weight_shape[0],), 1
    return op, tuple(weight_shape[:1]), 1


def find_layers(original: onnx.ModelProto, model: onnx.ModelProto, original_shapes: dict,
                output_masks: dict) -> tuple[list[LinearView], list[dict]]:
    """Views of the layers of `model` to re-fit, with their dependency level, and the skipped ones."""
    inits = Initializers(model)
    original_producer = {o: n for n in original.graph.node for o in n.output}
    original_weights = {t.name: tuple(t.dims) for t in original.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    views, skipped = [], []
    level_of: dict[str, int] = {}
    for node in model.graph.node:
        level = max((level_of.get(t, 0) for t in node.input), default=0)
        view = None
        if node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx"):
            before = original_producer.get(node.output[0])
            view = _candidate(node, before, inits, original_weights, original_shapes, output_masks, consumers, skipped)
        if view is not None:
            view.level = level
            views.append(view)
        for name in node.output:
            level_of[name] = level + (1 if view is not None else 0)
    return views, skipped


def _candidate(node, before, inits, original_weights, original_shapes, output_masks, consumers, skipped):
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if before is None or weight is None or before.op_type not in LAYER_OPS or len(before.input) < 2:
        return None
    attrs, before_attrs = _attrs(node), _attrs(before)
    before_shape = original_weights.get(before.input[1]) or original_shapes.get(before.input[1])
    signature = input_signature(node.op_type, weight.shape, attrs)
    if signature is None or signature == input_signature(before.op_type, tuple(before_shape or ()), before_attrs):
        return None
    name = node.name or node.output[0]

    def skip(reason):
        skipped.append({"name": name, "op": node.op_type, "status": "skipped", "reason": reason})

    if weight.dtype.kind != "f":
        return skip(f"weights are {weight.dtype}, not floating point")
    if node.op_type == "MatMul" and weight.ndim != 2:
        return skip("MatMul weight is not 2-D")
    attrs["weight_shape"] = weight.shape
    groups = int(attrs.get("group", 1))
    bias, offset = _bias_slot(node, inits, consumers, attrs, weight)
    if bias is False:
        return skip("Gemm bias C is not per output channel")
    out_mask = output_masks.get(node.output[0])
    view = LinearView(node, node.op_type, groups, to_view_layout(node.op_type, weight.astype(np.float64), groups, attrs),
                      bias, offset, out_mask, attrs=attrs)
    channels = view.weight.shape[0] * view.weight.shape[2]
    if out_mask is not None and int(out_mask.sum()) != channels:
        return skip(f"output channel mask ({int(out_mask.sum())} kept) does not match the layer ({channels})")
    return view


def _bias_slot(node, inits, consumers, attrs, weight):
    """(BiasSlot or None, fixed offset); (False, None) when the bias cannot be handled."""
    op = node.op_type
    channels = weight.shape[0] if op == "Conv" else None
    if op == "ConvTranspose":
        channels = weight.shape[1] * int(attrs.get("group", 1))
    if op == "Gemm":
        channels = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
    if op in ("Conv", "ConvTranspose", "Gemm"):
        scale = float(attrs.get("beta", 1.0)) if op == "Gemm" else 1.0
        present = len(node.input) > 2 and node.input[2] != ""
        values = inits.get(node.input[2]) if present else None
        if present and values is None:
            return False, None
        if not present:
            attrs["bias_shape"] = (channels,)
            return (BiasSlot(np.zeros(channels), node, 2, scale) if scale else None), np.zeros(1)
        if values.size == channels and values.shape[-1] == channels:
            attrs["bias_shape"] = values.shape
            return BiasSlot(values.reshape(-1).astype(np.float64) * scale, node, 2, scale), np.zeros(1)
        if values.size == 1:
            return None, values.reshape(1).astype(np.float64) * scale
        return False, None
    # MatMul: an Add of a per-channel constant right after it, used by nobody else, takes the offset
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = 1 if add.input[0] == node.output[0] else 0
        values = inits.get(add.input[other])
        if values is not None and values.size == weight.shape[1] and values.shape[-1] == weight.shape[1]:
            return BiasSlot(np.zeros(weight.shape[1]), add, other, additive=True), np.zeros(1)
    return None, np.zeros(1)
