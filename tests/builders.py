"""Shared pieces of the test models: assembling a checked model, a layer builder, feeds and runs.

The models themselves live beside the tests of their op family, in ``tests/ops/test_<family>.py``
(each with a ``BUILDERS`` dict); ``tests.models.all_builders()`` gathers them. Conventions:


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
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 17
CONV_INPUT = [1, 3, 16, 16]


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
    domains: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """Assemble a checked model.

    ``inputs``/``outputs`` items are ValueInfoProtos, ``(name, shape[, elem_type])`` tuples or bare
    names (float32, shape unknown).  Output shapes left unknown are filled in by strict shape
    inference, so every graph output ends up with a static shape.  The IR version is the lowest
    that ``opset`` needs. ``domains``: further opsets to import (``{"com.microsoft": 1}`` for
    onnxruntime's fused ops, whose outputs shape inference leaves open: give the graph output's shape).
    """
    graph = helper.make_graph(
        list(nodes), name, [_value_info(i) for i in inputs], [_value_info(o) for o in outputs],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="onnxprune-tests",
        ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True),
    )
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    for out, inf in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
    return model



class Builder:
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

    def model(self, inputs, outputs=("y",), name="model", opset=None, domains=None) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits,
                          opset=opset or self.opset, name=name, domains=domains)

    def output(self, tensor: str, name: str = "y") -> None:
        """Rename the tensor ``tensor`` (last produced by some node) to the graph output ``name``."""
        for n in self.nodes:
            for i, o in enumerate(n.output):
                if o == tensor:
                    n.output[i] = name
            for i, o in enumerate(n.input):
                if o == tensor:
                    n.input[i] = name



def x_input(shape=CONV_INPUT):
    return [("x", list(shape))]


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

