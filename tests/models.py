"""Builders of small ONNX models for the pruning exactness tests.

Every builder returns an ``onnx.ModelProto`` that passes ``onnx.checker.check_model(full_check=True)``
and runs in onnxruntime.  Conventions:

* float32, one graph input named ``"x"`` with a static shape (batch 1; ``[1, 3, 16, 16]`` for conv
  nets unless stated), one graph output ``"y"`` (the blocked ``graph_output`` case has two);
* default opset 17 (IR version the lowest that opset needs, so ORT accepts it);
* weights are initializers named ``"<node>.weight"`` / ``"<node>.bias"`` ..., random from
  ``np.random.default_rng(seed)`` (``seed`` keyword, default 0) and scaled by ``1/sqrt(fan_in)`` so
  activations stay O(1); BatchNormalization has random gamma/beta/mean and positive var;
* node names are unique and meaningful (``conv1``, ``bn1``, ``relu1`` ...); a node's output tensor is
  named after the node (``conv1`` -> ``"conv1_out"``);
* every model ends in a layer that *consumes* the channels under test (Conv, Gemm, MatMul), so those
  channels never reach a graph output directly (except in the ``blocked_graph_output`` case).

Each builder's docstring says which channel group is meant to be prunable.  ``all_builders()``
maps a name to a zero-argument callable for every model; ``python tests/models.py`` builds them
all, runs the full checker and one onnxruntime inference for each, and prints a line per model.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 17
CONV_INPUT = [1, 3, 16, 16]

# ------------------------------------------------------------------------------------------------
# shared boilerplate


def _value_info(spec) -> onnx.ValueInfoProto:
    """ValueInfoProto from a ValueInfoProto, a name, (name, shape) or (name, shape, elem_type)."""
    if isinstance(spec, onnx.ValueInfoProto):
        return spec
    if isinstance(spec, str):
        return helper.make_tensor_value_info(spec, TensorProto.FLOAT, None)
    name, shape, *rest = spec
    elem = rest[0] if rest else TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Iterable,
    outputs: Iterable,
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = DEFAULT_OPSET,
    name: str = "model",
) -> onnx.ModelProto:
    """Assemble a checked model.

    ``inputs``/``outputs`` items are ValueInfoProtos, ``(name, shape[, elem_type])`` tuples or bare
    names (float32, shape unknown).  Output shapes left unknown are filled in by strict shape
    inference, so every graph output ends up with a static shape.  The IR version is the lowest
    that ``opset`` needs.
    """
    graph = helper.make_graph(
        list(nodes), name, [_value_info(i) for i in inputs], [_value_info(o) for o in outputs],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="onnxprune-tests",
        ir_version=helper.find_min_ir_version_for(opsets),
    )
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    for out, inf in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
    return model


class _Builder:
    """Accumulates nodes and initializers; helpers return the name of the produced tensor."""

    def __init__(self, seed: int = 0, opset: int = DEFAULT_OPSET):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- primitives
    def const(self, name: str, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        assert name not in self._names, name
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def randn(self, name: str, shape, std: float = 1.0) -> str:
        return self.const(name, self.rng.standard_normal(shape) * std)

    def node(self, op: str, name: str, inputs: Sequence[str], n_out: int = 1, **attrs):
        assert name not in self._names, name
        self._names.add(name)
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    # -- layers
    def conv(self, name, x, cin, cout, k=3, stride=1, pad=None, group=1, bias=True,
             bias_mean=0.0) -> str:
        pad = k // 2 if pad is None else pad
        fan_in = (cin // group) * k * k
        w = self.randn(f"{name}.weight", [cout, cin // group, k, k], 1 / math.sqrt(fan_in))
        ins = [x, w]
        if bias:
            ins.append(self.const(f"{name}.bias", bias_mean + 0.1 * self.rng.standard_normal(cout)))
        return self.node("Conv", name, ins, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, group=group)

    def conv_transpose(self, name, x, cin, cout, k=2, stride=2, group=1, bias=True) -> str:
        fan_in = (cin // group) * k * k / (stride * stride)
        w = self.randn(f"{name}.weight", [cin, cout // group, k, k], 1 / math.sqrt(fan_in))
        ins = [x, w]
        if bias:
            ins.append(self.randn(f"{name}.bias", [cout], 0.1))
        return self.node("ConvTranspose", name, ins, kernel_shape=[k, k],
                         strides=[stride, stride], group=group)

    def bn(self, name, x, c) -> str:
        r = self.rng
        ins = [
            x,
            self.const(f"{name}.scale", r.uniform(0.5, 1.5, c)),
            self.const(f"{name}.bias", r.standard_normal(c) * 0.1),
            self.const(f"{name}.mean", r.standard_normal(c) * 0.1),
            self.const(f"{name}.var", r.uniform(0.5, 1.5, c)),
        ]
        return self.node("BatchNormalization", name, ins, epsilon=1e-5)

    def relu(self, name, x) -> str:
        return self.node("Relu", name, [x])

    def matmul(self, name, x, k, n) -> str:
        return self.node("MatMul", name, [x, self.randn(f"{name}.weight", [k, n], 1 / math.sqrt(k))])

    def add_bias(self, name, x, n) -> str:
        return self.node("Add", name, [x, self.randn(f"{name}.bias", [n], 0.1)])

    def model(self, inputs, outputs=("y",), name="model", opset=None) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits,
                          opset=opset or self.opset, name=name)

    def output(self, tensor: str, name: str = "y") -> None:
        """Rename the tensor ``tensor`` (last produced by some node) to the graph output ``name``."""
        for n in self.nodes:
            for i, o in enumerate(n.output):
                if o == tensor:
                    n.output[i] = name
            for i, o in enumerate(n.input):
                if o == tensor:
                    n.input[i] = name


def _x(shape=CONV_INPUT):
    return [("x", list(shape))]


# ------------------------------------------------------------------------------------------------
# basic conv patterns


def conv_chain(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, k3, pad1) + bias -> Relu -> Conv(8->4).  Prunable: conv1's 8 output channels."""
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="conv_chain")


def conv_bn_relu(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, no bias) -> BatchNormalization -> Relu -> Conv(8->4).

    Prunable: the 8 channels of conv1/bn1 (one group).
    """
    b = _Builder(seed)
    h = b.relu("relu1", b.bn("bn1", b.conv("conv1", "x", 3, 8, bias=False), 8))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="conv_bn_relu")


def residual(seed: int = 0) -> onnx.ModelProto:
    """conv1 -> bn1 -> relu1 -> [conv2 -> bn2] + skip(relu1) -> Add -> relu2 -> conv3(8->4).

    Prunable: one group of 8 channels joining conv1/bn1 and conv2/bn2 outputs (the Add couples them;
    conv2's input channels are the same group).
    """
    b = _Builder(seed)
    r = b.relu("relu1", b.bn("bn1", b.conv("conv1", "x", 3, 8, bias=False), 8))
    h = b.bn("bn2", b.conv("conv2", r, 8, 8, bias=False), 8)
    h = b.relu("relu2", b.node("Add", "add1", [h, r]))
    b.output(b.conv("conv3", h, 8, 4))
    return b.model(_x(), name="residual")


def residual_downsample(seed: int = 0) -> onnx.ModelProto:
    """conv0(3->8) -> relu0 -> {conv_a(8->16, k3, stride 2) -> bn_a ; shortcut(8->16, 1x1, stride 2)
    -> bn_s} -> Add -> relu -> conv_out(16->4).

    Prunable: the 16-channel group joining conv_a/bn_a and shortcut/bn_s (via the Add); separately
    conv0's 8 channels (consumed by both branches).
    """
    b = _Builder(seed)
    h = b.relu("relu0", b.conv("conv0", "x", 3, 8))
    a = b.bn("bn_a", b.conv("conv_a", h, 8, 16, k=3, stride=2, bias=False), 16)
    s = b.bn("bn_s", b.conv("shortcut", h, 8, 16, k=1, stride=2, pad=0, bias=False), 16)
    h = b.relu("relu1", b.node("Add", "add1", [a, s]))
    b.output(b.conv("conv_out", h, 16, 4))
    return b.model(_x(), name="residual_downsample")


def concat(seed: int = 0) -> onnx.ModelProto:
    """conv_a(3->4), conv_b(3->6) -> Concat(axis=1) -> Relu -> conv_out(10->4).

    Prunable: conv_a's 4 and conv_b's 6 channels (two groups, mapped to offsets 0 and 4 of the concat).
    """
    b = _Builder(seed)
    a = b.conv("conv_a", "x", 3, 4)
    c = b.conv("conv_b", "x", 3, 6)
    h = b.relu("relu1", b.node("Concat", "concat1", [a, c], axis=1))
    b.output(b.conv("conv_out", h, 10, 4))
    return b.model(_x(), name="concat")


def split(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Split(axis=1, split=[3, 5] as an input) -> conv_a(3->4), conv_b(5->4) -> Add.

    Prunable: conv1's 8 channels; pruning changes the split sizes (indices 0..2 go to conv_a,
    3..7 to conv_b).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    sizes = b.const("split1.split", [3, 5], np.int64)
    p0, p1 = b.node("Split", "split1", [h, sizes], n_out=2, axis=1)
    a = b.conv("conv_a", p0, 3, 4)
    c = b.conv("conv_b", p1, 5, 4)
    b.output(b.node("Add", "add1", [a, c]))
    return b.model(_x(), name="split")


def channel_shuffle(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> grouped conv2(8->8, group 2) -> Reshape [1,2,4,16,16] -> Transpose(0,2,1,3,4)
    -> Reshape [1,8,16,16] -> conv3(8->4): the ShuffleNet channel shuffle.

    Prunable: conv2's channels, the same position j in both shuffle blocks together.
    """
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.conv("conv2", h, 8, 8, group=2)
    h = b.node("Reshape", "split_blocks", [h, b.const("split_blocks.shape", [1, 2, 4, 16, 16], np.int64)])
    h = b.node("Transpose", "shuffle", [h], perm=[0, 2, 1, 3, 4])
    h = b.node("Reshape", "merge_blocks", [h, b.const("merge_blocks.shape", [1, 8, 16, 16], np.int64)])
    b.output(b.conv("conv3", h, 8, 4))
    return b.model(_x(), name="channel_shuffle")


def slice_(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Slice(axis 1, starts 2, ends 7) -> conv2(5->4).

    Prunable: conv1's 8 channels; channels 0, 1, 7 are dead (sliced away), 2..6 reach conv2.
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    ins = [h, b.const("slice1.starts", [2], np.int64), b.const("slice1.ends", [7], np.int64),
           b.const("slice1.axes", [1], np.int64), b.const("slice1.steps", [1], np.int64)]
    h = b.node("Slice", "slice1", ins)
    b.output(b.conv("conv2", h, 5, 4))
    return b.model(_x(), name="slice")


def depthwise(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> depthwise Conv(group=8, 8->8, k3) -> Relu -> Conv 1x1(8->4).

    Prunable: one group of 8 channels (conv1 outputs coupled through the depthwise conv to its
    outputs).
    """
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.relu("relu2", b.conv("dwconv1", h, 8, 8, group=8))
    b.output(b.conv("conv2", h, 8, 4, k=1))
    return b.model(_x(), name="depthwise")


def depthwise_multiplier(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->4) -> depthwise Conv(group=4, 4->8, multiplier 2) -> conv2(8->4).

    Prunable: conv1's 4 channels; pruning input channel i removes dwconv1 outputs 2i, 2i+1.  The
    dwconv's 8 outputs can also be pruned individually (a separate group).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 4)
    h = b.conv("dwconv1", h, 4, 8, group=4)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="depthwise_multiplier")


def grouped(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Conv(group=2, 8->8) -> Relu -> conv2(8->4).

    Prunable: conv1's 8 channels (in two blocks of 4 feeding the two groups; pruning must keep the
    blocks equal-sized) and gconv1's 8 outputs (two blocks of 4).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.relu("relu1", b.conv("gconv1", h, 8, 8, group=2))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="grouped")


def conv_transpose(seed: int = 0, group: int = 1) -> onnx.ModelProto:
    """conv1(3->8) -> ConvTranspose(8->6, k2, stride 2, group) -> Relu -> conv2(6->4).

    Prunable: conv1's 8 channels (ConvTranspose weight axis 0) and deconv1's 6 outputs (weight axis
    1, per group).  Output is 32x32.
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.relu("relu1", b.conv_transpose("deconv1", h, 8, 6, group=group))
    b.output(b.conv("conv2", h, 6, 4))
    return b.model(_x(), name="conv_transpose" if group == 1 else "conv_transpose_grouped")


def conv_transpose_grouped(seed: int = 0) -> onnx.ModelProto:
    """conv_transpose with group=2 (weight [8, 3, 2, 2]); channels pruned per group block."""
    return conv_transpose(seed, group=2)


def instance_norm(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> InstanceNormalization(scale, B per channel) -> Relu -> conv2(8->4).

    Prunable: conv1's 8 channels (InstanceNormalization is per channel: scale/B sliced).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    ins = [h, b.const("in1.scale", b.rng.uniform(0.5, 1.5, 8)),
           b.const("in1.bias", b.rng.standard_normal(8) * 0.1)]
    h = b.relu("relu1", b.node("InstanceNormalization", "in1", ins, epsilon=1e-5))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="instance_norm")


def group_norm(seed: int = 0, opset: int = 21) -> onnx.ModelProto:
    """conv1(3->8) -> GroupNormalization(num_groups=4) -> conv2(8->4).

    opset 18: scale/bias have shape [num_groups] (the version-18 definition).  onnx >= 1.19's
    checker refuses it ("Op registered for GroupNormalization is deprecated in domain_version of
    18") although onnxruntime runs it, so it is listed in ``checker_rejected_builders()``, not
    ``all_builders()``.  opset 21: per-channel scale/bias of shape [C].  Prunable: conv1's 8 channels only in whole
    groups (2 channels per group), or only with num_groups changed -- statistics are per group, so
    pruning part of a group changes the result; a handler may reasonably block it.
    """
    if opset not in (18, 21):
        raise ValueError("group_norm: opset must be 18 or 21")
    b = _Builder(seed, opset=opset)
    h = b.conv("conv1", "x", 3, 8)
    n = 4 if opset == 18 else 8
    ins = [h, b.const("gn1.scale", b.rng.uniform(0.5, 1.5, n)),
           b.const("gn1.bias", b.rng.standard_normal(n) * 0.1)]
    h = b.node("GroupNormalization", "gn1", ins, num_groups=4, epsilon=1e-5)
    b.output(b.conv("conv2", h, 8, 4))
    # shape inference does not see through the GroupNormalization function: declare the output
    return b.model(_x(), outputs=[("y", [1, 4, 16, 16])], name=f"group_norm_opset{opset}")


# ------------------------------------------------------------------------------------------------
# element-wise ops

ACTIVATIONS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Erf", "Gelu",
    "Softplus", "Elu", "Selu", "Celu", "Softsign", "Mish", "ThresholdedRelu", "PRelu",
)
_ACT_OPSET = {"Gelu": 20, "Mish": 18}


def activation(op: str, seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> <op> -> conv2(8->4) for the element-wise activation ``op``.

    Clip takes min/max as scalar initializers; PRelu a per-channel slope of shape [8, 1, 1] (sliced
    with the channels); Gelu uses opset 20, Mish opset 18.  Prunable: conv1's 8 channels.
    """
    if op not in ACTIVATIONS:
        raise ValueError(f"unknown activation {op}")
    b = _Builder(seed, opset=_ACT_OPSET.get(op, DEFAULT_OPSET))
    h = b.conv("conv1", "x", 3, 8)
    name = f"act1_{op.lower()}"
    if op == "Clip":
        h = b.node(op, name, [h, b.const(f"{name}.min", -0.5), b.const(f"{name}.max", 0.8)])
    elif op == "PRelu":
        h = b.node(op, name, [h, b.const(f"{name}.slope", b.rng.uniform(0.05, 0.3, [8, 1, 1]))])
    elif op == "LeakyRelu":
        h = b.node(op, name, [h], alpha=0.1)
    elif op == "ThresholdedRelu":
        h = b.node(op, name, [h], alpha=0.1)
    else:
        h = b.node(op, name, [h])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name=f"activation_{op}")


def silu(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Mul(h, Sigmoid(h)) -> conv2(8->4).

    Prunable: conv1's 8 channels (the Mul has two non-constant operands from the same group).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.node("Mul", "silu1_mul", [h, b.node("Sigmoid", "silu1_sigmoid", [h])])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="silu")


PER_CHANNEL_OPS = ("Add", "Sub", "Mul", "Div")
PER_CHANNEL_VARIANTS = ("channel", "scalar", "first")


def per_channel_const(op: str, variant: str = "channel", seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> <op>(h, c) -> conv2(8->4) with a constant ``c``.

    variant "channel": c has shape [1, 8, 1, 1] (sliced with the channels); "scalar": c has shape
    [] (passes through); "first": c of shape [1, 8, 1, 1] is the FIRST operand, <op>(c, h).
    Prunable: conv1's 8 channels.  Div constants stay away from zero.  For Div/"first" (c / h)
    conv1's bias is centred on 5 so that h stays away from zero; caveat: zeroing a channel of conv1
    makes c / 0 = inf there, so an exactness oracle must make channels dead through conv2's input
    weights rather than by zeroing conv1.
    """
    if op not in PER_CHANNEL_OPS or variant not in PER_CHANNEL_VARIANTS:
        raise ValueError(f"per_channel_const({op!r}, {variant!r})")
    b = _Builder(seed)
    # c / h needs h away from zero: conv1's bias is centred on 5 there (h ~ N(5, 1))
    h = b.conv("conv1", "x", 3, 8, bias_mean=5.0 if (op, variant) == ("Div", "first") else 0.0)
    shape = [] if variant == "scalar" else [1, 8, 1, 1]
    if op in ("Mul", "Div"):
        vals = b.rng.uniform(0.5, 1.5, shape) * b.rng.choice([-1.0, 1.0], shape)
    else:
        vals = b.rng.standard_normal(shape) * 0.5
    if (op, variant) == ("Div", "first"):
        vals = vals * 5.0  # keeps c / h O(1)
    c = b.const(f"{op.lower()}1.const", vals)
    ins = [c, h] if variant == "first" else [h, c]
    h = b.node(op, f"{op.lower()}1", ins)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name=f"per_channel_{op}_{variant}")


# ------------------------------------------------------------------------------------------------
# pooling, SE, resize, pad, pass-through

POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def pooling(op: str, seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> <op> -> conv2(8->4, 1x1).  MaxPool/AveragePool are k2 stride 2.

    Prunable: conv1's 8 channels (pooling is per channel).
    """
    if op not in POOLS:
        raise ValueError(f"unknown pooling op {op}")
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    if op.startswith("Global"):
        h = b.node(op, "pool1", [h])
    else:
        h = b.node(op, "pool1", [h], kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.conv("conv2", h, 8, 4, k=1))
    return b.model(_x(), name=f"pooling_{op}")


def squeeze_excite(seed: int = 0, pool: str = "reducemean", opset: int = DEFAULT_OPSET
                   ) -> onnx.ModelProto:
    """conv1(3->8) -> Relu = h; ReduceMean(h, [2, 3], keepdims=1) (or GlobalAveragePool) ->
    se_reduce 1x1 (8->2) -> Relu -> se_expand 1x1 (2->8) -> HardSigmoid = s; Mul(h, s) ->
    conv2(8->4).

    Prunable: one 8-channel group joining conv1 and se_expand outputs (the Mul couples them; the
    pooling and se_reduce's inputs follow); separately se_reduce's 2 channels.  ReduceMean axes are
    an attribute below opset 18 and an input from 18 on.
    """
    if pool not in ("reducemean", "gap"):
        raise ValueError(pool)
    b = _Builder(seed, opset=opset)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    if pool == "gap":
        p = b.node("GlobalAveragePool", "se_pool", [h])
    elif opset < 18:
        p = b.node("ReduceMean", "se_pool", [h], axes=[2, 3], keepdims=1)
    else:
        p = b.node("ReduceMean", "se_pool", [h, b.const("se_pool.axes", [2, 3], np.int64)],
                   keepdims=1)
    s = b.relu("se_relu", b.conv("se_reduce", p, 8, 2, k=1))
    s = b.node("HardSigmoid", "se_gate", [b.conv("se_expand", s, 2, 8, k=1)])
    h = b.node("Mul", "se_mul", [h, s])
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name=f"squeeze_excite_{pool}_opset{opset}")


def resize(seed: int = 0, use_sizes: bool = False) -> onnx.ModelProto:
    """conv1(3->8) -> Resize(nearest, x2) -> conv2(8->4).

    ``use_sizes=False``: scales [1, 1, 2, 2]; ``True``: sizes [1, 8, 32, 32], whose channel entry
    must be rewritten when pruning.  Prunable: conv1's 8 channels.
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    if use_sizes:
        ins = [h, "", "", b.const("resize1.sizes", [1, 8, 32, 32], np.int64)]
    else:
        ins = [h, "", b.const("resize1.scales", [1, 1, 2, 2])]
    h = b.node("Resize", "resize1", ins, mode="nearest")
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="resize_sizes" if use_sizes else "resize")


def pad(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Pad(constant mode, 1 on each spatial side, value 0) -> conv2(8->4, pad 0).

    Prunable: conv1's 8 channels (pads on the channel axis are zero).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    ins = [h, b.const("pad1.pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
           b.const("pad1.value", 0.0)]
    h = b.node("Pad", "pad1", ins, mode="constant")
    b.output(b.conv("conv2", h, 8, 4, pad=0))
    return b.model(_x(), name="pad")


def passthrough(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Dropout (inference) -> Identity -> Cast(to float) -> conv2(8->4).

    Prunable: conv1's 8 channels (all three ops pass channels through).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    h = b.node("Dropout", "dropout1", [h])
    h = b.node("Identity", "identity1", [h])
    h = b.node("Cast", "cast1", [h], to=TensorProto.FLOAT)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="passthrough")


# ------------------------------------------------------------------------------------------------
# into fully connected layers


def _conv_to_fc(seed: int, how: str) -> onnx.ModelProto:
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 4))  # [1, 4, 4, 4]
    if how == "flatten":
        h = b.node("Flatten", "flatten1", [h], axis=1)
    else:
        shape = [1, -1] if how == "reshape" else [1, 64]
        h = b.node("Reshape", "reshape1", [h, b.const("reshape1.shape", shape, np.int64)])
    ins = [h, b.randn("fc1.weight", [10, 64], 1 / 8), b.randn("fc1.bias", [10], 0.1)]
    b.output(b.node("Gemm", "fc1", ins, transB=1))
    return b.model(_x([1, 3, 4, 4]), name=f"{how}_gemm")


def flatten_gemm(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,4,4] -> conv1(3->4) -> Relu -> Flatten(axis=1) -> Gemm(transB=1, 64->10).

    Prunable: conv1's 4 channels; channel c maps to Gemm input columns 16c .. 16c+15.
    """
    return _conv_to_fc(seed, "flatten")


def reshape_gemm(seed: int = 0) -> onnx.ModelProto:
    """flatten_gemm with Reshape to a constant shape [1, -1] instead of Flatten."""
    return _conv_to_fc(seed, "reshape")


def reshape_gemm_literal(seed: int = 0) -> onnx.ModelProto:
    """flatten_gemm with Reshape to the literal shape [1, 64] (must become [1, 16 * kept])."""
    return _conv_to_fc(seed, "literal")


def reshape_computed(seed: int = 0, read_channels: bool = False) -> onnx.ModelProto:
    """conv1(3->4) on 1x3x4x4 -> Relu -> Reshape to Concat(Shape(x)[0:1], [-1]) -> Gemm(64->10): the
    ``x.view(x.size(0), -1)`` export. With read_channels the target is Concat(Shape(x)[0:2], [-1]),
    which reads the channel count: the group must be blocked.
    """
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 4))
    shape = b.node("Shape", "shape1", [h])
    ends = 2 if read_channels else 1
    head = b.node("Slice", "head", [shape, b.const("head.starts", [0], np.int64),
                                     b.const("head.ends", [ends], np.int64), b.const("head.axes", [0], np.int64)])
    target = b.node("Concat", "target", [head, b.const("target.rest", [-1], np.int64)], axis=0)
    flat = b.node("Reshape", "flatten", [h, target])
    if read_channels:  # [1, 4, 16]: a MatMul over the spatial features
        b.output(b.matmul("fc", flat, 16, 10))
    else:
        b.output(b.node("Gemm", "fc", [flat, b.randn("fc.weight", [10, 64], 0.125)], transB=1))
    return b.model(_x([1, 3, 4, 4]), name="reshape_computed")


def mlp(seed: int = 0) -> onnx.ModelProto:
    """Transformer MLP on x [1, 5, 16]: MatMul W1[16,32] -> Add b1[32] -> GELU spelled out as
    h * 0.5 * (1 + Erf(h / sqrt 2)) (Div, Erf, Add, Mul, Mul as PyTorch exports it) ->
    MatMul W2[32,16] -> Add b2[16].

    Prunable: the hidden 32 channels (last axis; W1 columns, b1, W2 rows).
    """
    b = _Builder(seed)
    h = b.add_bias("fc1_bias", b.matmul("fc1", "x", 16, 32), 32)
    t = b.node("Div", "gelu_div", [h, b.const("gelu.sqrt2", math.sqrt(2.0))])
    t = b.node("Erf", "gelu_erf", [t])
    t = b.node("Add", "gelu_add", [t, b.const("gelu.one", 1.0)])
    t = b.node("Mul", "gelu_mul", [h, t])
    t = b.node("Mul", "gelu_half", [t, b.const("gelu.half", 0.5)])
    b.output(b.add_bias("fc2_bias", b.matmul("fc2", t, 32, 16), 16))
    return b.model([("x", [1, 5, 16])], name="mlp")


def mlp_gemm(seed: int = 0) -> onnx.ModelProto:
    """2-D x [4, 16] -> Gemm(transB=1, W1[32,16]) -> Relu -> Gemm(transB=0, W2[32,8]).

    Prunable: the hidden 32 channels (W1 rows, bias, W2 rows).
    """
    b = _Builder(seed)
    h = b.node("Gemm", "fc1", ["x", b.randn("fc1.weight", [32, 16], 0.25),
                                b.randn("fc1.bias", [32], 0.1)], transB=1)
    h = b.relu("relu1", h)
    b.output(b.node("Gemm", "fc2", [h, b.randn("fc2.weight", [32, 8], 1 / math.sqrt(32)),
                                    b.randn("fc2.bias", [8], 0.1)]))
    return b.model([("x", [4, 16])], name="mlp_gemm")


def transpose_nhwc(seed: int = 0) -> onnx.ModelProto:
    """TF-export style: x NHWC [1,8,8,3] -> Transpose(0,3,1,2) -> conv1(3->8) -> Relu -> conv2(8->4).

    Prunable: conv1's 8 channels.
    """
    b = _Builder(seed)
    h = b.node("Transpose", "to_nchw", ["x"], perm=[0, 3, 1, 2])
    h = b.relu("relu1", b.conv("conv1", h, 3, 8))
    b.output(b.conv("conv2", h, 8, 4))
    return b.model([("x", [1, 8, 8, 3])], name="transpose_nhwc")


def transpose_matmul(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,8,8] -> conv1(3->8) -> Relu -> Transpose(0,2,3,1) to NHWC -> MatMul W[8,4] (last axis).

    Prunable: conv1's 8 channels, which sit on the last axis after the Transpose (W rows).
    """
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.node("Transpose", "to_nhwc", [h], perm=[0, 2, 3, 1])
    b.output(b.matmul("fc1", h, 8, 4))
    return b.model(_x([1, 3, 8, 8]), name="transpose_matmul")


# ------------------------------------------------------------------------------------------------
# blocked cases: nothing should be pruned through them


def blocked_graph_output(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> conv2(8->4) = y, and conv1's output is also graph output "feat".

    Blocked: conv1's channels reach a graph output.  (conv2's 4 channels reach y as well.)
    """
    b = _Builder(seed)
    f = b.conv("conv1", "x", 3, 8)
    b.output(f, "feat")
    h = b.relu("relu1", "feat")
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), outputs=("y", "feat"), name="blocked_graph_output")


def blocked_softmax(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Softmax(axis=1) -> conv2(8->4).  Blocked: Softmax mixes the channels."""
    b = _Builder(seed)
    h = b.node("Softmax", "softmax1", [b.conv("conv1", "x", 3, 8)], axis=1)
    b.output(b.conv("conv2", h, 8, 4))
    return b.model(_x(), name="blocked_softmax")


def blocked_layernorm(seed: int = 0) -> onnx.ModelProto:
    """x [1,5,16] -> MatMul W1[16,32] -> Add b1 -> LayerNormalization(axis=-1) -> MatMul W2[32,16].

    Blocked: LayerNormalization normalizes over the 32 hidden channels (statistics mix them).
    """
    b = _Builder(seed)
    h = b.add_bias("fc1_bias", b.matmul("fc1", "x", 16, 32), 32)
    ins = [h, b.const("ln1.scale", b.rng.uniform(0.5, 1.5, 32)),
           b.const("ln1.bias", b.rng.standard_normal(32) * 0.1)]
    h = b.node("LayerNormalization", "ln1", ins, axis=-1, epsilon=1e-5)
    b.output(b.matmul("fc2", h, 32, 16))
    return b.model([("x", [1, 5, 16])], name="blocked_layernorm")


def blocked_topk(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> TopK(k=8, axis=3) values -> conv2(8->4).

    Blocked: TopK has no handler (it would even keep channels apart here: it sorts along W).
    """
    b = _Builder(seed)
    h = b.conv("conv1", "x", 3, 8)
    vals, _ = b.node("TopK", "topk1", [h, b.const("topk1.k", [8], np.int64)], n_out=2, axis=3)
    b.output(b.conv("conv2", vals, 8, 4))
    return b.model(_x(), name="blocked_topk")


def blocked_einsum(seed: int = 0) -> onnx.ModelProto:
    """conv1(3->8) -> Relu -> Einsum("nchw,oc->nohw", h, W[4,8]) (a 1x1 conv spelled as Einsum).

    Blocked: Einsum has no handler.
    """
    b = _Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    w = b.randn("einsum1.weight", [4, 8], 1 / math.sqrt(8))
    b.output(b.node("Einsum", "einsum1", [h, w], equation="nchw,oc->nohw"))
    return b.model(_x(), name="blocked_einsum")


# ------------------------------------------------------------------------------------------------
# transforms


def weights_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with every initializer moved into a ``Constant`` node (as PaddlePaddle
    exports do, e.g. the PP-OCR models): a loader must fold them back.  Input is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in g.initializer]
    nodes = consts + list(g.node)
    del g.initializer[:]
    del g.node[:]
    g.node.extend(nodes)
    return out


def conv_bn_relu_constant_nodes(seed: int = 0) -> onnx.ModelProto:
    """conv_bn_relu with all weights in Constant nodes instead of initializers."""
    return weights_as_constants(conv_bn_relu(seed))


# ------------------------------------------------------------------------------------------------
# registry


def all_builders() -> dict[str, Callable[[], onnx.ModelProto]]:
    """Every model above, name -> zero-argument callable (op-argument builders expanded)."""
    d: dict[str, Callable[[], onnx.ModelProto]] = {
        "conv_chain": conv_chain,
        "conv_bn_relu": conv_bn_relu,
        "conv_bn_relu_constant_nodes": conv_bn_relu_constant_nodes,
        "residual": residual,
        "residual_downsample": residual_downsample,
        "concat": concat,
        "split": split,
        "slice": slice_,
        "channel_shuffle": channel_shuffle,
        "reshape_computed": reshape_computed,
        "blocked_shape_read": lambda: reshape_computed(read_channels=True),
        "depthwise": depthwise,
        "depthwise_multiplier": depthwise_multiplier,
        "grouped": grouped,
        "conv_transpose": conv_transpose,
        "conv_transpose_grouped": conv_transpose_grouped,
        "instance_norm": instance_norm,
        "group_norm_opset21": functools.partial(group_norm, opset=21),
    }
    for op in ACTIVATIONS:
        d[f"activation_{op}"] = functools.partial(activation, op)
    d["silu"] = silu
    for op in PER_CHANNEL_OPS:
        for v in PER_CHANNEL_VARIANTS:
            d[f"per_channel_{op}_{v}"] = functools.partial(per_channel_const, op, v)
    for op in POOLS:
        d[f"pooling_{op}"] = functools.partial(pooling, op)
    d.update({
        "squeeze_excite": squeeze_excite,
        "squeeze_excite_gap": functools.partial(squeeze_excite, pool="gap"),
        "squeeze_excite_opset18": functools.partial(squeeze_excite, opset=18),
        "resize": resize,
        "resize_sizes": functools.partial(resize, use_sizes=True),
        "pad": pad,
        "passthrough": passthrough,
        "flatten_gemm": flatten_gemm,
        "reshape_gemm": reshape_gemm,
        "reshape_gemm_literal": reshape_gemm_literal,
        "mlp": mlp,
        "mlp_gemm": mlp_gemm,
        "transpose_nhwc": transpose_nhwc,
        "transpose_matmul": transpose_matmul,
        "blocked_graph_output": blocked_graph_output,
        "blocked_softmax": blocked_softmax,
        "blocked_layernorm": blocked_layernorm,
        "blocked_topk": blocked_topk,
        "blocked_einsum": blocked_einsum,
    })
    return d


def checker_rejected_builders() -> dict[str, Callable[[], onnx.ModelProto]]:
    """Models that onnxruntime runs but onnx's checker refuses (as real exporters still write them).

    ``group_norm_opset18``: GroupNormalization-18, which onnx now reports as deprecated.
    """
    return {"group_norm_opset18": functools.partial(group_norm, opset=18)}


def random_input(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded standard-normal float32 feed for every graph input of ``model``."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` once in onnxruntime (CPU, graph optimizations off) and return all outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _self_check() -> int:
    failures = 0
    builders = all_builders()
    for name, build in builders.items():
        try:
            m = build()
            onnx.checker.check_model(m, full_check=True)
            outs = run(m, random_input(m))
            desc = ", ".join(f"{o.name}{[d.dim_value for d in o.type.tensor_type.shape.dim]}"
                             for o in m.graph.output)
            stats = " ".join(f"std={np.std(o):.3g}" for o in outs)
            bad = not all(np.isfinite(o).all() for o in outs)
            ops = sorted({n.op_type for n in m.graph.node})
            print(f"{'FAIL' if bad else 'ok  '} {name:32s} opset={m.opset_import[0].version} "
                  f"ir={m.ir_version} {desc} {stats}{' NON-FINITE' if bad else ''} {ops}")
            failures += bad
        except Exception as e:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"FAIL {name:32s} {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    for name, build in checker_rejected_builders().items():
        try:
            m = build()
            try:
                onnx.checker.check_model(m, full_check=True)
                verdict = "checker now accepts it"
            except onnx.checker.ValidationError as e:
                verdict = "checker refuses (expected): " + str(e).splitlines()[0][:80]
            outs = run(m, random_input(m))
            bad = not all(np.isfinite(o).all() for o in outs)
            print(f"{'FAIL' if bad else 'ok  '} {name:32s} opset={m.opset_import[0].version} "
                  f"ir={m.ir_version} ORT ran it; {verdict}")
            failures += bad
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL {name:32s} {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        builders = {**builders, name: build}
    print(f"{len(builders) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    sys.exit(_self_check())
