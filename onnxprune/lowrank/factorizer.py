"""Replace a layer by its two factors, in an onnx-graphsurgeon graph.

The factors come as a linear map on one output position's features (see `lowrank.layers`):
A [j, in/j, r] (j input subspaces, r outputs each) and B [j*r, out]. Here they become ONNX nodes:

- MatMul:  MatMul(x, A) -> MatMul(., B)                                (2-D and batched inputs alike)
- Gemm:    Gemm(x, A, transA as before) -> Gemm(., B, C, beta as before)    (alpha is folded into A, B)
- Conv:    Conv(x, A as [j*r, c_in/j, k...], group=j, the original kernel_shape, strides, pads,
           dilations and auto_pad) -> Conv 1x1(., B as [c_out, j*r, 1...], bias)

The second node writes the original output tensor, so consumers are untouched.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .layers import Layer, layer_name

FIRST_FACTOR_ATTRS = ("strides", "pads", "dilations", "auto_pad", "kernel_shape")


class Factorizer:
    """Replaces nodes of one graph; call `finish()` once after the last replacement."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes = {layer_name(n): n for n in graph.nodes}
        self.names = set(graph.tensors()) | {n.name for n in graph.nodes}

    def replace(self, layer: Layer, a: np.ndarray, b: np.ndarray) -> tuple[gs.Node, gs.Node]:
        node = self.nodes[layer.name]
        build = {"MatMul": self._matmul, "Gemm": self._gemm, "Conv": self._conv}[layer.op]
        first, second = build(node, layer, a.astype(layer.weight_dtype), b.astype(layer.weight_dtype))
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.extend([first, second])
        return first, second

    def finish(self) -> None:
        self.graph.cleanup().toposort()

    def _matmul(self, node, layer, a, b):
        hidden = self._hidden(node)
        first = self._node(node, "MatMul", "a", {}, [node.inputs[0], self._const(node, "a", a[0])], hidden)
        second = self._node(node, "MatMul", "b", {}, [hidden, self._const(node, "b", b)], node.outputs[0])
        return first, second

    def _gemm(self, node, layer, a, b):
        hidden = self._hidden(node)
        first = self._node(node, "Gemm", "a", {"transA": int(node.attrs.get("transA", 0))},
                           [node.inputs[0], self._const(node, "a", a[0])], hidden)
        bias = list(node.inputs[2:3])
        attrs = {"beta": float(node.attrs.get("beta", 1.0))} if bias else {}
        second = self._node(node, "Gemm", "b", attrs, [hidden, self._const(node, "b", b), *bias], node.outputs[0])
        return first, second

    def _conv(self, node, layer, a, b):
        subspaces, per_subspace, rank = a.shape
        kernel = layer.kernel
        first_weight = a.transpose(0, 2, 1).reshape(subspaces * rank, layer.channels_in // subspaces, *kernel)
        second_weight = b.T.reshape(b.shape[1], subspaces * rank, *([1] * len(kernel)))
        attrs = {k: node.attrs[k] for k in FIRST_FACTOR_ATTRS if k in node.attrs}
        attrs["group"] = subspaces
        hidden = self._hidden(node)
        first = self._node(node, "Conv", "a", attrs, [node.inputs[0], self._const(node, "a", first_weight)], hidden)
        second = self._node(node, "Conv", "b", {"kernel_shape": [1] * len(kernel)},
                            [hidden, self._const(node, "b", second_weight), *node.inputs[2:3]], node.outputs[0])
        return first, second

    def _node(self, node, op, part, attrs, inputs, output) -> gs.Node:
        return gs.Node(op, name=self._unique(f"{layer_name(node)}_lowrank_{part}"), attrs=attrs,
                       inputs=inputs, outputs=[output], domain=node.domain)

    def _hidden(self, node) -> gs.Variable:
        return gs.Variable(self._unique(f"{node.outputs[0].name}_lowrank"), dtype=node.outputs[0].dtype)

    def _const(self, node, part, values) -> gs.Constant:
        return gs.Constant(self._unique(f"{node.inputs[1].name}_lowrank_{part}"), np.ascontiguousarray(values))

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}{i}"
        self.names.add(name)
        return name
