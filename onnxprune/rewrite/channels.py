"""Remove channels: turn kept units into per-tensor keep masks and let each op handler slice its node."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InternalError
from ..graph.analysis import Analysis
from ..io import transposed_copies
from ..ops import handler_for


def keep_masks(analysis: Analysis, keep: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep mask of every tracked tensor that loses channels, given kept unit positions per group."""
    kept_label = np.ones(len(analysis.label), dtype=bool)
    for group in analysis.groups:
        if group.index not in keep:
            continue
        dropped = np.ones(group.channels, dtype=bool)
        dropped[np.asarray(keep[group.index], dtype=np.int64)] = False
        kept_label[group.unit_labels[dropped]] = False
    masks = {}
    for name, cmap in analysis.maps.items():
        mask = kept_label[analysis.label[cmap.ids]]
        if not mask.all():
            masks[name] = mask
    return masks


class RewriteContext:
    """What a handler's `rewrite` sees: masks, the original ranks and axes, and safe setters."""

    def __init__(self, analysis: Analysis, masks: dict[str, np.ndarray]):
        self.analysis = analysis
        self.masks = masks
        self.opset = analysis.graph.opset
        self.sources = {id(s.node) for g in analysis.groups for s in g.sources}
        self._names = dict.fromkeys(analysis.graph.tensors())
        self.copies: dict[str, list[gs.Constant]] = {}  # shared constants' copies, by the shared one's name

    def mask(self, tensor: gs.Tensor) -> np.ndarray | None:
        return self.masks.get(tensor.name)

    def tracked_axis(self, tensor: gs.Tensor) -> int:
        return self.analysis.maps[tensor.name].axis

    def rank(self, tensor: gs.Tensor) -> int:
        return len(self.analysis.shapes[tensor.name])

    def is_source(self, node: gs.Node) -> bool:
        return id(node) in self.sources

    def is_tracked(self, tensor: gs.Tensor) -> bool:
        """Whether the analysis followed channels into `tensor`."""
        return tensor.name in self.analysis.maps

    def set_input(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Replace a constant input's values; a constant other nodes share is copied, not changed."""
        old = node.inputs[index]
        replace_constant(node, index, np.ascontiguousarray(values, dtype=old.values.dtype), lambda: self._unique(old.name),
                         self.copies)

    def add_input(self, node: gs.Node, values: np.ndarray) -> None:
        node.inputs.append(gs.Constant(self._unique(f"{node.name}_input{len(node.inputs)}"), np.asarray(values)))

    @staticmethod
    def set_attr(node: gs.Node, name: str, value) -> None:
        node.attrs[name] = value

    def add_node(self, op: str, inputs: list, output: gs.Variable | None = None, **attrs) -> gs.Variable:
        """A new node of the graph reading `inputs` (tensors, or arrays made constants); its output (a
        new tensor unless `output` is given)."""
        name = self._unique(op.lower())
        tensors = [t if isinstance(t, gs.Tensor) else gs.Constant(self._unique(f"{name}_input{i}"), np.asarray(t))
                   for i, t in enumerate(inputs)]
        output = output if output is not None else self.new_tensor(f"{name}_out")
        self.analysis.graph.nodes.append(gs.Node(op, name, dict(attrs), tensors, [output]))
        return output

    def new_tensor(self, base: str) -> gs.Variable:
        """A new tensor with a name no other tensor has."""
        return gs.Variable(self._unique(base))

    def _unique(self, base: str) -> str:
        name, i = f"{base}_pruned", 1
        while name in self._names:
            i += 1
            name = f"{base}_pruned{i}"
        self._names[name] = None
        return name


def replace_constant(node: gs.Node, index: int, values: np.ndarray, copy_name: Callable[[], str],
                     copies: dict[str, list[gs.Constant]] | None = None) -> None:
    """Give constant input `index` of `node` these values, in place; a constant that other nodes share
    is copied under `copy_name()` instead (asked only then, so names are drawn only when used), the copy
    listed in `copies` under the shared one's name for `merge_equal_copies`."""
    old = node.inputs[index]
    if len(old.outputs) == 1:
        old.values = values
        return
    node.inputs[index] = gs.Constant(copy_name(), values)
    if copies is not None:
        copies.setdefault(old.name, [old]).append(node.inputs[index])


def apply_channel_plan(analysis: Analysis, masks: dict[str, np.ndarray]) -> None:
    """Slice every node of `analysis.graph` for the kept channels (`keep_masks`), in place."""
    for name, mask in masks.items():
        if not mask.any():
            raise InternalError(f"pruning would leave tensor '{name}' with no channels")
    rw = RewriteContext(analysis, masks)
    graph = analysis.graph
    for node in graph.nodes:
        names = [t.name for t in list(node.inputs) + list(node.outputs)]
        if any(n in masks for n in names):
            handler_for(node.op, node.domain).rewrite(node, rw)
    merge_equal_copies(rw.copies)
    tie_transposed_copies(rw)
    _widen_outputs(graph, rw)
    _forget_stale_shapes(graph, masks)
    graph.cleanup().toposort()


def merge_equal_copies(copies: dict[str, list[gs.Constant]]) -> None:
    """A constant several nodes share was copied for each node that changed it; copies that came out equal
    (the analysis joins the channels of nodes sharing a weight, so they are sliced alike) become one again."""
    for family in copies.values():
        kept: list[gs.Constant] = []
        for tensor in family:
            values = tensor.values
            same = next((k for k in kept if isinstance(values, np.ndarray) and isinstance(k.values, np.ndarray)
                         and k.values.dtype == values.dtype and np.array_equal(k.values, values)), None)
            if same is None:
                kept.append(tensor)
                continue
            for node in list(tensor.outputs):
                for i, t in enumerate(node.inputs):
                    if t is tensor:
                        node.inputs[i] = same


def tie_transposed_copies(rw: RewriteContext) -> None:
    """A constant equal to another transposed (`io.transposed_copies`; the analysis joined their channels, so
    the cut slices them alike) is read through a Transpose of that one, as the exporter had it: stored once.
    The pairs are found again, not taken from the analysis: a constant several nodes read is replaced by
    its sliced copies (`replace_constant`)."""
    for copy, source in transposed_copies(rw.analysis.graph):
        tied = rw.add_node("Transpose", [source], perm=[1, 0])
        for node in list(copy.outputs):
            for i in [i for i, t in enumerate(node.inputs) if t is copy]:
                node.inputs[i] = tied


def _widen_outputs(graph: gs.Graph, rw: RewriteContext) -> None:
    """A graph output that lost channels (the analysis lets only an opt-in's through: `AnalysisContext.widen`)
    keeps its width: the kept channels in their places, zeros at the removed ones (a zero pad slot gathered
    to them); nodes inside the graph read the narrow tensor."""
    for out in graph.outputs:
        mask = rw.mask(out)
        if mask is None:
            continue
        axis, rank = rw.tracked_axis(out), rw.rank(out)
        kept = rw.new_tensor(f"{out.name}_kept")
        for node in list(out.outputs):
            for i in [i for i, t in enumerate(node.inputs) if t is out]:
                node.inputs[i] = kept
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = kept
        pads = np.zeros(2 * rank, dtype=np.int64)
        pads[rank + axis] = 1
        padded = rw.add_node("Pad", [kept, pads])
        index = np.where(mask, np.cumsum(mask) - 1, int(mask.sum()))
        rw.add_node("Gather", [padded, index.astype(np.int64)], output=out, axis=axis)


def _forget_stale_shapes(graph: gs.Graph, masks) -> None:
    """Shapes recorded for intermediate tensors no longer hold; onnxruntime re-infers them."""
    boundary = {t.name for t in list(graph.inputs) + list(graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
            tensor.shape = None
