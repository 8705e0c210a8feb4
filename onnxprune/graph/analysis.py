"""Dependency analysis: which channels of which layers must shrink together.

Every layer that creates new channels (a Conv's filters, a Gemm's or MatMul's output features) is a
*source*; each of its channels gets a global integer id. Walking the graph in topological order, op
handlers attach a `ChannelMap` (the axis carrying channels and the id of every position on it) to every
tensor the channels flow into: activations copy it, Concat concatenates, Split and Slice cut it, Flatten
repeats each id over the flattened block. Where two tensors must stay aligned element by element
(a residual Add, a Mul by a gate), the handler *joins* their ids; where channels reach something that
cannot be sliced (a graph output, an op without a handler, an unmappable Reshape), it *blocks* them.

At the end, joined ids become *units* (the smallest sets that are kept or removed together) and the
sources that share units become *groups*. A group is prunable when nothing blocks it.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..io import transposed_copies
from ..ops import handler_for
from ..ops.base import known_shape

log = logging.getLogger(__name__)


@dataclass
class ChannelMap:
    """Channels carried by one tensor: `ids[i]` is the global channel at position i of `axis`.

    After a channel shuffle splits the channel axis (Reshape [N, g*c, ...] -> [N, g, c, ...]), `ids` has
    one dimension per split axis, spanning axes `axis, axis + 1, ...`; only Reshape and Transpose
    handlers (`multi_axis = True`) accept such maps, others block them.
    """

    axis: int
    ids: np.ndarray


@dataclass
class Source:
    node: gs.Node
    tensor: str
    start: int  # first global id
    count: int


@dataclass
class Group:
    """Sources whose channels are pruned together, and the units a pruning decision is made on."""

    index: int
    sources: list[Source]
    unit_labels: np.ndarray  # label of each unit, ordered by the lowest channel id it contains
    members: list[str] = field(default_factory=list)  # names of every node touching the group
    blocked: list[str] = field(default_factory=list)  # reasons it cannot be pruned
    inexact: list[str] = field(default_factory=list)  # opted-in reasons pruning it changes outputs

    @property
    def channels(self) -> int:
        return len(self.unit_labels)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def name(self) -> str:
        return self.sources[0].node.name

    @property
    def width(self) -> int:
        """Channels one unit holds in a source (an attention head: head_dim); 1 unless every source's
        channels divide evenly among the units."""
        counts = [s.count for s in self.sources]
        if any(count % self.channels for count in counts):
            return 1
        return min(counts) // self.channels


class AnalysisContext:
    """What handlers read (constants, shapes, channel maps) and write (maps, joins, blocks, sources)."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple], opset: int, options=frozenset()):
        self.graph = graph
        self.opset = opset
        self.shapes = shapes
        self.options = frozenset(options)  # opt-in behaviours of handlers, by name (see `allows`)
        self.maps: dict[str, ChannelMap] = {}
        self.sources: list[Source] = []
        self.next_id = 0
        self.fixed: list[tuple[np.ndarray, str]] = []  # ids of channels that no source owns
        self.joins: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.inexacts: list[tuple[np.ndarray, str]] = []
        self.widened: list[np.ndarray] = []  # ids a graph output may carry at full width (see `widen`)

    # reading
    @functools.cached_property
    def outputs_anywhere(self) -> frozenset[str]:
        """Names of the graph's outputs and of every subgraph's (If, Loop and Scan bodies, nested): values
        that leave where a handler can follow them."""
        return frozenset(t.name for g in _graph_and_subgraphs(self.graph) for t in g.outputs)

    def allows(self, option: str) -> bool:
        """The user opted in to `option` (a name a handler defines, e.g. `ops.base.HIDDEN`)."""
        return option in self.options

    def channels(self, tensor: gs.Tensor) -> ChannelMap | None:
        return self.maps.get(tensor.name) if tensor is not None else None

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        return known_shape(self.shapes, tensor)

    @staticmethod
    def const(tensor: gs.Tensor) -> np.ndarray | None:
        return tensor.values if isinstance(tensor, gs.Constant) else None

    # writing
    def set(self, tensor: gs.Tensor, cmap: ChannelMap) -> None:
        self.maps[tensor.name] = ChannelMap(cmap.axis, np.asarray(cmap.ids, dtype=np.int64))

    def new_source(self, node: gs.Node, tensor: gs.Tensor, count: int, axis: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + count, dtype=np.int64)
        self.sources.append(Source(node, tensor.name, self.next_id, count))
        self.next_id += count
        self.set(tensor, ChannelMap(axis, ids))
        return ids

    def new_fixed(self, count: int, reason: str) -> np.ndarray:
        """Ids for channels no source owns (e.g. a graph input concatenated with pruned channels)."""
        ids = np.arange(self.next_id, self.next_id + count, dtype=np.int64)
        self.next_id += count
        self.fixed.append((ids, reason))
        return ids

    def join(self, a: np.ndarray, b: np.ndarray) -> None:
        """Channel a[i] and b[i] are kept or removed together."""
        self.joins.append((np.asarray(a, dtype=np.int64).ravel(), np.asarray(b, dtype=np.int64).ravel()))

    def block(self, ids: np.ndarray, reason: str) -> None:
        self.blocks.append((np.asarray(ids, dtype=np.int64).ravel(), reason))

    def widen(self, ids: np.ndarray) -> None:
        """An opt-in made these channels prunable: a graph output carrying them is not blocked but keeps
        its width, zeros where channels were removed."""
        self.widened.append(np.asarray(ids, dtype=np.int64).ravel())

    def inexact(self, ids: np.ndarray, reason: str) -> None:
        """An opt-in made these channels prunable although removing them changes the outputs even when
        they carry nothing: the group stays prunable and says why (and is widened at outputs, `widen`)."""
        self.inexacts.append((np.asarray(ids, dtype=np.int64).ravel(), reason))
        self.widen(ids)

    def block_inputs(self, node: gs.Node, reason: str, positions=None) -> None:
        """Block the channels of every tracked input (or of those at `positions`)."""
        for i, tensor in enumerate(node.inputs):
            if positions is not None and i not in positions:
                continue
            cmap = self.channels(tensor)
            if cmap is not None:
                self.block(cmap.ids, f"{node.op} '{node.name}': {reason}")

    def block_unexpected(self, node: gs.Node, channel_inputs) -> None:
        """Block channels arriving at inputs the handler does not slice (weights, shapes, ...)."""
        others = [i for i in range(len(node.inputs)) if i not in channel_inputs]
        self.block_inputs(node, "channels reach an input that cannot be sliced", others)


@dataclass
class Analysis:
    """The result of `analyze`: channel maps, units and groups."""

    graph: gs.Graph
    shapes: dict[str, tuple]
    maps: dict[str, ChannelMap]
    label: np.ndarray  # unit label of every global channel id
    groups: list[Group]
    position: np.ndarray  # for a unit label: the unit's position within its group
    group_of: np.ndarray  # for a unit label: its group's index (-1: no group)

    @classmethod
    def build(cls, graph, shapes, maps, label, groups):
        position = np.full(len(label), -1, dtype=np.int64)
        group_of = np.full(len(label), -1, dtype=np.int64)
        for group in groups:
            position[group.unit_labels] = np.arange(group.channels)
            group_of[group.unit_labels] = group.index
        return cls(graph, shapes, maps, label, groups, position, group_of)

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def coverage(self) -> float:
        """Fraction of source channels (Conv/ConvTranspose/Gemm/MatMul outputs) in prunable groups."""
        total = sum(s.count for g in self.groups for s in g.sources)
        prunable = sum(s.count for g in self.prunable_groups() for s in g.sources)
        return prunable / total if total else 0.0


def analyze(graph: gs.Graph, shapes: dict[str, tuple], exclude: list[str] | tuple = (), options=frozenset()) -> Analysis:
    """Find the channel groups of `graph` (not modified). `exclude`: node-name patterns left whole;
    `options`: names of opt-in handler behaviours (`AnalysisContext.allows`)."""
    ctx = AnalysisContext(graph, shapes, graph.opset, options)
    for node in graph.nodes:
        handler = handler_for(node.op, node.domain)
        if handler is None:
            ctx.block_inputs(node, "no handler for this op type")
            continue
        if not handler.multi_axis and any(m.ids.ndim > 1 for t in node.inputs if (m := ctx.channels(t))):
            ctx.block_inputs(node, "channels split across several axes (a channel shuffle) reach this op")
            continue
        handler.propagate(node, ctx)
    _join_shared_weights(ctx)
    label = _connected_labels(ctx.next_id, ctx.joins)
    _block_at_boundaries(graph, ctx, label)
    groups = _build_groups(ctx, label, exclude)
    return Analysis.build(graph, shapes, ctx.maps, label, groups)


def _join_shared_weights(ctx: AnalysisContext) -> None:
    """A weight several nodes read (a Siamese network's branches, ALBERT's repeated layer, a deduplicated
    export) stays one tensor only if every reader slices it alike: the channels indexing each of its axes
    are joined across the readers (`Handler.weight_channels`), and where one reader cannot slice an axis (or
    its handler does not say how it reads the weight), the others' channels there are blocked: cutting
    them would store the weight twice, making the model larger."""
    pairs = transposed_copies(ctx.graph)  # one weight read as it is and transposed: a copy's axis a is its
    # source's axis 1 - a (`rewrite.channels.tie_transposed_copies` stores it once again)
    source_of = {copy.name: source for copy, source in pairs}
    copy_of = {source.name: copy for copy, source in pairs}
    readers: dict[str, tuple[gs.Constant, dict[int, dict]]] = {}  # name -> (weight, id of a reader -> its axes)
    for node in ctx.graph.nodes:
        handler = handler_for(node.op, node.domain)
        found = handler.weight_channels(node, ctx) if handler is not None else None
        if found is not None:
            weight, axes = found
            if weight.name in source_of:
                weight, axes = source_of[weight.name], {1 - axis: ids for axis, ids in axes.items()}
            readers.setdefault(weight.name, (weight, {}))[1][id(node)] = axes
    for name, (weight, axes_of) in readers.items():
        nodes = [*weight.outputs, *(copy_of[name].outputs if name in copy_of else [])]
        if len(nodes) < 2:
            continue
        for axis in sorted({axis for axes in axes_of.values() for axis in axes}):
            ids = [(node, axes_of.get(id(node), {}).get(axis)) for node in nodes]
            tracked = [(node, i) for node, i in ids if i is not None]
            keeps = next((node for node, i in ids if i is None), None)  # a reader that cannot slice the axis
            if keeps is None:
                for _, i in tracked[1:]:
                    ctx.join(tracked[0][1], i)
                continue
            for node, i in tracked:
                ctx.block(i, f"{node.op} '{node.name}': its weight '{name}' is shared with {keeps.op} "
                             f"'{keeps.name}', which keeps these channels (cutting them would store it twice)")


def _graph_and_subgraphs(graph: gs.Graph):
    yield graph
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            yield from _graph_and_subgraphs(subgraph)


def _block_at_boundaries(graph: gs.Graph, ctx: AnalysisContext, label: np.ndarray) -> None:
    widened = label[np.concatenate(ctx.widened)] if ctx.widened else np.zeros(0, np.int64)
    for tensor in graph.outputs:
        cmap = ctx.channels(tensor)
        if cmap is not None and not np.isin(label[cmap.ids], widened).all():
            ctx.block(cmap.ids, f"channels reach graph output '{tensor.name}'")
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            used = {t.name for n in subgraph.nodes for t in n.inputs}
            for name in used & ctx.maps.keys():
                ctx.block(ctx.maps[name].ids, f"{node.op} '{node.name}': channels are used inside a subgraph")


def _connected_labels(count: int, joins) -> np.ndarray:
    """Connected components of the join graph, by min-label propagation with pointer jumping."""
    label = np.arange(count, dtype=np.int64)
    if not joins or count == 0:
        return label
    a = np.concatenate([j[0] for j in joins])
    b = np.concatenate([j[1] for j in joins])
    while True:
        low = np.minimum(label[a], label[b])
        before = label.copy()
        np.minimum.at(label, a, low)
        np.minimum.at(label, b, low)
        while True:  # pointer jumping: follow labels to their roots
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label


def _build_groups(ctx: AnalysisContext, label: np.ndarray, exclude) -> list[Group]:
    # Sources that share a unit label belong to one group: union them through their labels.
    count = len(ctx.sources)
    owner = np.full(len(label), -1, dtype=np.int64)  # source index of every id
    for index, source in enumerate(ctx.sources):
        owner[source.start:source.start + source.count] = index
    parent = list(range(count))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owned = owner >= 0
    pairs = np.unique(np.stack([label[owned], owner[owned]], axis=1), axis=0) if owned.any() else np.zeros((0, 2), np.int64)
    first_owner_of_label = {}
    for lab, src in pairs.tolist():
        if lab in first_owner_of_label:
            ra, rb = find(first_owner_of_label[lab]), find(src)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        else:
            first_owner_of_label[lab] = src

    roots = sorted({find(i) for i in range(count)})
    group_of_source = {root: gi for gi, root in enumerate(roots)}
    group_index = np.array([group_of_source[find(i)] for i in range(count)], dtype=np.int64)
    group_of_label = np.full(len(label), -1, dtype=np.int64)
    group_of_label[label[owned]] = group_index[owner[owned]]

    groups = []
    for gi, root in enumerate(roots):
        sources = [s for i, s in enumerate(ctx.sources) if group_index[i] == gi]
        ids = np.concatenate([np.arange(s.start, s.start + s.count) for s in sources])
        labels, first = np.unique(label[ids], return_index=True)
        order = np.argsort(ids[first], kind="stable")
        groups.append(Group(gi, sources, labels[order]))

    def groups_of(ids):
        found = group_of_label[label[ids]]
        return np.unique(found[found >= 0])

    for ids, reason in ctx.blocks:
        for gi in groups_of(ids):
            _add_reason(groups[gi], reason)
    for ids, reason in ctx.fixed:
        for gi in groups_of(ids):
            _add_reason(groups[gi], f"channels are aligned with channels no layer owns ({reason})")
    for ids, reason in ctx.inexacts:
        for gi in groups_of(ids):
            if reason not in groups[gi].inexact:
                groups[gi].inexact.append(reason)

    members = [dict() for _ in groups]
    for node in ctx.graph.nodes:
        for tensor in list(node.inputs) + list(node.outputs):
            cmap = ctx.maps.get(tensor.name)
            if cmap is None:
                continue
            for gi in groups_of(cmap.ids):
                members[gi][node.name] = None
    for group, names in zip(groups, members):
        group.members = list(names)
        hits = [n for n in group.members if any(fnmatch.fnmatchcase(n, p) for p in exclude)]
        if hits:
            _add_reason(group, f"excluded: member '{hits[0]}' matches --exclude")
        if group.channels < 2:
            _add_reason(group, "only one channel")
    return groups


def _add_reason(group: Group, reason: str) -> None:
    if reason not in group.blocked:
        group.blocked.append(reason)
