"""A measured latency model: each prunable layer's onnxruntime CPU time as a function of its kept input and
output channels, fitted to timings of the layer alone with the per-channel chain that follows it.

Each layer that reads or writes prunable channels and that its op handler can time alone
(`Handler.timing_sides`: Conv/Gemm/MatMul with a constant weight, grouped or depthwise; LSTM/GRU/RNN)
is built as a small model at the analysed input shape: the layer, then its chain (`chain_after`: the nodes
after it that act per channel on its output's channels, `Handler.per_channel`: BatchNormalization,
activations, arithmetic with constants or between tensors of the chain, as in x * clip(x + 3, 0, 6) / 6;
a node that also reads a tensor from outside the chain is not in it, nor what follows from it; the chain's
tensors read outside it are read in the timed model by a one-element Slice (`read_end`), so that onnxruntime
fuses the chain into the layer as in the whole model, no more; a chain it fuses whole, Conv +
BatchNormalization + HardSwish, is left out, `unfused`: timed with it, the rotation classifier's predicted
speed-up overshot). The chain's time shrinks with the layer's output channels, so the pout terms of the fit
carry it (unfused hard-swish chains were a quarter of the PP-OCR detector's time). Random weights (the
chain's: positive; its one-value constants kept), the handlers' `rewrite` slicing it to the first k channels,
timed (`LatencyConfig`-style interleaved runs, median) at a few channel
counts: all, and for each side at a multiple of 8 below 3/4 of the channels and one channel fewer, at
one below 1/2 and 1, 5 and 9 channels fewer (which tells steps of 4, 8 and 16 apart), plus both sides at
half (a depthwise layer: those counts on its one side); a grouped conv, and a layer onnxruntime runs
blocked (below) with `MIN_UNITS` of its block on each side, at those counts of units of its blocks (all
channels too). The fit (`fit_layer`) is, for the multiple m
among `MULTIPLES` that fits best, time = a + b pin pout + c pin + d pout, with pin = ceil(k_in / m) m /
C_in (pout likewise): the product term is compute, the single terms memory traffic, and m the step at
which the kernels change. A recurrent layer has c pout^2 (the recurrence) in place of c pin; a depthwise
one is a + b pout (its input channels are its output channels).

A layer that onnxruntime's CPU optimizer moves into its blocked channel layout (NCHWc: Convs, padded
inside to blocks of 8 or 16 channels) stays in it in a whole model only at some channel multiples (onnxruntime
1.32 here: input channels in fours): a Conv cut off them runs unblocked, its activation unfused, with layout
conversions around it, which timing the layer alone does not see (the rotation classifier at 60% of its
MACs: 5 of 32 Convs blocked at `--round-to 1`, all 32 at `--round-to 8`). Each fit records the smallest
multiple at which its layer stays blocked (`LayerFit.block`, measured by `layer_block`), and
`--round-to auto` never rounds such a layer's channels to a smaller one.

Fits are cached in a JSON file (`LatencyCache`) keyed by the layers (names, shapes, attributes), the
thread count and the machine, so a `--plan-in` run or a sweep beside the same output reuses them and a
different shape or thread count measures anew.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..ops import handler_for
from ..ops.base import ONNX_DOMAINS
from ..runtime import build_session
from ..workdir import staging_path, temp_folder
from .latency import LatencyConfig, latency_session, model_clock, summarize, time_runs

MULTIPLES = (1, 4, 8, 16, 32)
TIMING = LatencyConfig(runs=7, warmup=2)
CACHE_VERSION = 5
KINDS = ("dense", "depthwise", "recurrent")  # Handler.timing_sides
KEPT_VALUES = 1024  # a non-float constant input up to this size is timed with its own values
BLOCKED_DOMAIN = "com.microsoft.nchwc"  # the nodes of onnxruntime's blocked channel layout
MIN_UNITS = 8  # a blocked layer is timed in units of its block when each side has at least this many
LAYOUT_OPS = ("Slice", "ReorderInput", "ReorderOutput")  # what the timed model adds around a fused layer


@dataclass(frozen=True)
class LayerFit:
    """One layer's time in ms: `coef` . `features` at step `multiple` (see the module docstring)."""

    name: str
    c_in: int
    c_out: int
    multiple: int
    coef: tuple[float, float, float, float]
    kind: str = "dense"
    block: int = 1  # onnxruntime runs the layer in its blocked layout at multiples of this (1: never)

    def predict(self, k_in, k_out) -> np.ndarray:
        return features(k_in, k_out, self.c_in, self.c_out, self.multiple, self.kind) @ np.asarray(self.coef)


def features(k_in, k_out, c_in: int, c_out: int, multiple: int, kind: str = "dense") -> np.ndarray:
    """[points, 4] with the kept counts padded up to `multiple`: 1, pin pout, pin, pout (a recurrent layer:
    pout^2 for pin; a depthwise one: 1, pout, 0, 0)."""
    p_in = np.minimum(np.ceil(np.asarray(k_in, dtype=np.float64) / multiple) * multiple, c_in) / c_in
    p_out = np.minimum(np.ceil(np.asarray(k_out, dtype=np.float64) / multiple) * multiple, c_out) / c_out
    p_in, p_out = np.broadcast_arrays(p_in, p_out)
    if kind == "depthwise":
        return np.stack([np.ones_like(p_out), p_out, np.zeros_like(p_out), np.zeros_like(p_out)], axis=-1)
    single = p_out * p_out if kind == "recurrent" else p_in
    return np.stack([np.ones_like(p_in), p_in * p_out, single, p_out], axis=-1)


def fit_layer(name: str, c_in: int, c_out: int, k_in, k_out, ms, kind: str = "dense") -> LayerFit:
    """The least-squares fit of the multiple in `MULTIPLES` (up to the smaller side) with the smallest
    residual; a larger multiple must cut it by a tenth to be chosen over a smaller one."""
    ms = np.asarray(ms, dtype=np.float64)
    best = None
    for multiple in (m for m in MULTIPLES if m <= max(1, min(c_in, c_out))):
        x = features(k_in, k_out, c_in, c_out, multiple, kind)
        coef = np.linalg.lstsq(x, ms, rcond=None)[0]
        residual = float(np.sum((x @ coef - ms) ** 2))
        if best is None or residual < 0.9 * best[0]:
            best = (residual, multiple, coef)
    return LayerFit(name, int(c_in), int(c_out), best[1], tuple(float(c) for c in best[2]), kind)


def sample_counts(c_in: int, c_out: int, kind: str = "dense", step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(k_in, k_out) at which a layer is timed: see the module docstring. `step` > 1: those counts of
    `step`-channel units, and all channels (a grouped conv keeps its blocks' j-th channels together; a layer
    onnxruntime runs blocked is cut only to multiples of its block: its time at other counts, unblocked,
    would bend the fit)."""
    if step > 1:
        k_in, k_out = sample_counts(c_in // step, c_out // step, kind)
        pairs = set(zip(k_in * step, k_out * step)) | {(c_in, c_out)}
        k_in, k_out = np.array(sorted(pairs)).T
        return k_in, k_out
    points = {(c_in, c_out), (max(1, c_in // 2), max(1, c_out // 2))}
    for fraction, below in ((0.75, (0, 1)), (0.5, (0, 1, 5, 9))):
        for c, side in ((c_in, 0), (c_out, 1)):
            k = int(c * fraction) // 8 * 8 or max(1, int(c * fraction))
            for kept in {max(1, k - d) for d in below}:
                points.add((kept, c_out) if side == 0 else (c_in, kept))
    k_in, k_out = np.array(sorted(points)).T
    if kind == "depthwise":  # one side: output channels are the input's
        k_in = np.unique(np.concatenate([k_in, k_out]))
        k_out = k_in * c_out // c_in
    return k_in, k_out


# ---------------------------------------------------------------- timing one layer alone


@dataclass(frozen=True)
class ChainStep:
    """A per-channel node of the chain after a layer (`chain_after`): its inputs are each the index of a chain
    tensor (0: the layer's output 0, i: step i's output), a constant (`_constant`) or None (omitted)."""

    op: str
    attrs: dict
    inputs: tuple

    def key(self) -> list:
        return [self.op, sorted((k, repr(v)) for k, v in self.attrs.items()), list(self.inputs)]


@dataclass(frozen=True)
class TimedLayer:
    """What is needed to build a layer alone at other channel counts."""

    name: str
    op: str
    attrs: dict
    input_shape: tuple
    constants: tuple  # per input after the first: (shape, dtype name[, values]) of a constant (`_constant`),
    # None when omitted
    outputs: tuple  # per output: whether it is produced (named)
    data_axis: int
    c_out: int
    kind: str  # KINDS
    opset: int
    blocks: int = 1  # equal blocks of each side whose j-th channels go together (a grouped conv's groups)
    chain: tuple = ()  # the ChainSteps timed with the layer
    ends: tuple = (0,)  # the chain tensors that are outputs of the timed model (read outside the chain)
    out_axis: int = 1  # the axis of the layer's output 0 that carries its output channels, and its rank
    out_rank: int = 4

    @property
    def c_in(self) -> int:
        return self.input_shape[self.data_axis]

    def input_shape_at(self, k_in: int) -> list:
        """The input's shape with `k_in` channels."""
        shape = list(self.input_shape)
        shape[self.data_axis] = k_in
        return shape

    def key(self) -> list:
        return [self.name, self.op, sorted((k, repr(v)) for k, v in self.attrs.items()), list(self.input_shape),
                [None if c is None else [list(c[0]), *c[1:]] for c in self.constants], list(self.outputs), self.kind,
                self.blocks, [step.key() for step in self.chain], list(self.ends)]


def timed_layer(node, shapes: dict, opset: int) -> TimedLayer | None:
    """The layer of a graphsurgeon node when it can be timed alone (see the module docstring), else None."""
    handler = handler_for(node.op, node.domain)
    shape = shapes.get(node.inputs[0].name) if node.inputs else None
    sides = handler.timing_sides(node) if handler is not None else None
    if sides is None or shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    if any(t.name and not isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return None  # a computed operand: not a layer alone
    axis, c_in, c_out, kind, blocks = sides
    data_axis = axis % len(shape)
    if shape[data_axis] != c_in:
        return None
    constants = tuple(_constant(t) if t.name else None for t in node.inputs[1:])
    return TimedLayer(layer_label(node), node.op, dict(node.attrs), tuple(int(d) for d in shape), constants,
                      tuple(bool(t.name) for t in node.outputs), data_axis, int(c_out), kind, opset, int(blocks))


def _constant(tensor: gs.Constant, scalars: bool = False) -> tuple:
    """A constant input as `TimedLayer.constants` keeps it: by shape and type (random values time alike),
    and a small integer one with its values too (sequence lengths: random ones would time no steps), and with
    `scalars` a one-value one too (a chain's Clip bounds, or Pow's exponent, which its kernel may special-case)."""
    values = tensor.values
    if (np.issubdtype(values.dtype, np.floating) and not (scalars and values.size == 1)) or values.size > KEPT_VALUES:
        return tuple(values.shape), values.dtype.name
    return tuple(values.shape), values.dtype.name, tuple(values.ravel().tolist())


def _constant_values(constant: tuple, rng, positive: bool = False) -> np.ndarray:
    """Random values of a constant's shape and type (`positive`: in [0.5, 1.5), so a chain's normalization
    variances and divisors time as real ones, not as NaNs), or its kept values."""
    shape, dtype = constant[:2]
    if len(constant) > 2:
        return np.array(constant[2], dtype=dtype).reshape(shape)
    if positive:
        return rng.uniform(0.5, 1.5, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype) if shape else np.zeros(shape, dtype)


def chain_after(node, analysis) -> list:
    """The nodes after `node` that its handler says act per channel (`Handler.per_channel`: activations,
    BatchNormalization, arithmetic with constants) on its output 0's channels, at its shape, fed only from
    that output, each other or constants, in graph order (a node fed from outside the chain stops it there)."""
    first = node.outputs[0]
    cmap, shape = analysis.maps.get(first.name), analysis.shapes.get(first.name)
    if cmap is None or shape is None:
        return []
    nodes = analysis.graph.nodes
    chain, tensors = [], {first.name}
    unread = {id(c) for c in first.outputs}  # readers of the chain's tensors not yet passed (the graph is sorted)
    for candidate in nodes[next(i for i, n in enumerate(nodes) if n is node) + 1:]:
        if not unread:
            break
        unread.discard(id(candidate))
        # a timed chain is rebuilt from op names in ONNX's domain: another domain's op is not in it
        handler = handler_for(candidate.op) if candidate.domain in ONNX_DOMAINS else None
        fed = [t.name for t in candidate.inputs if t.name and not isinstance(t, gs.Constant)]
        out = candidate.outputs[0] if candidate.outputs else None
        if (handler is None or not fed or not set(fed) <= tensors or out is None or not handler.per_channel(candidate)
                or any(t.name for t in candidate.outputs[1:])):
            continue
        out_map = analysis.maps.get(out.name)
        if (analysis.shapes.get(out.name) != shape or out_map is None or out_map.axis != cmap.axis
                or not np.array_equal(out_map.ids, cmap.ids)):
            continue
        chain.append(candidate)
        tensors.add(out.name)
        unread.update(id(c) for c in out.outputs)
    return chain


def with_chain(layer: TimedLayer, node, analysis) -> TimedLayer:
    """`layer` with the chain after its node (`chain_after`); the chain tensors read outside it, graph outputs
    and those it does not read itself are the ends (a conv's output also read by a residual Add stays one)."""
    chain = chain_after(node, analysis)
    if not chain:
        return layer
    tensors = [node.outputs[0]] + [n.outputs[0] for n in chain]
    index = {t.name: i for i, t in enumerate(tensors)}
    steps = tuple(ChainStep(n.op, dict(n.attrs), tuple(
        None if not t.name else _constant(t, scalars=True) if isinstance(t, gs.Constant) else index[t.name]
        for t in n.inputs)) for n in chain)
    members = {id(n) for n in chain}
    graph_outputs = {t.name for t in analysis.graph.outputs}
    ends = tuple(i for i, t in enumerate(tensors)
                 if t.name in graph_outputs or not t.outputs or any(id(c) not in members for c in t.outputs))
    cmap = analysis.maps[node.outputs[0].name]
    return replace(layer, chain=steps, ends=ends, out_axis=int(cmap.axis),
                   out_rank=len(analysis.shapes[node.outputs[0].name]))


class AloneRewrite:
    """What a handler's `rewrite` sees when a layer alone keeps the first channels of its input and outputs."""

    def __init__(self, masks: dict[str, np.ndarray], axis: int, rank: int):
        self.masks, self.axis, self._rank = masks, axis, rank

    def mask(self, tensor) -> np.ndarray | None:
        return self.masks.get(tensor.name)

    def tracked_axis(self, tensor) -> int:  # asked of chain tensors only: the layer's output's
        return self.axis

    def rank(self, tensor) -> int:
        return self._rank

    @staticmethod
    def is_source(node) -> bool:
        return True

    @staticmethod
    def is_tracked(tensor) -> bool:  # a chain's computed tensors all carry the layer's channels
        return True

    @staticmethod
    def set_input(node, index: int, values: np.ndarray) -> None:
        node.inputs[index] = gs.Constant(node.inputs[index].name, np.ascontiguousarray(values))

    @staticmethod
    def set_attr(node, name: str, value) -> None:
        node.attrs[name] = value


def layer_model(layer: TimedLayer, k_in: int, k_out: int) -> onnx.ModelProto:
    """The layer and its chain alone with `k_in` input and `k_out` output channels (a depthwise layer: k_in,
    and the outputs that follow them), random weights sliced by the handlers' `rewrite`."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, layer.input_shape_at(k_in))
    inputs = [x] + [gs.Variable("") if c is None else gs.Constant(f"c{i}", _constant_values(c, rng))
                    for i, c in enumerate(layer.constants, 1)]
    outputs = [gs.Variable(f"y{i}" if made else "", np.float32) for i, made in enumerate(layer.outputs)]
    node = gs.Node(layer.op, "layer", dict(layer.attrs), inputs, outputs)
    nodes, tensors = [node], [outputs[0]]
    for i, step in enumerate(layer.chain, 1):
        operands = [tensors[s] if isinstance(s, int) else gs.Variable("") if s is None
                    else gs.Constant(f"s{i}_{j}", _constant_values(s, rng, positive=True)) for j, s in enumerate(step.inputs)]
        tensors.append(gs.Variable(f"t{i}", np.float32))
        nodes.append(gs.Node(step.op, f"step{i}", dict(step.attrs), operands, [tensors[-1]]))
    b = layer.blocks
    kept_in = np.tile(np.arange(layer.c_in // b) < k_in // b, b)
    kept_out = np.repeat(kept_in, layer.c_out // layer.c_in) if layer.kind == "depthwise" \
        else np.tile(np.arange(layer.c_out // b) < k_out // b, b)
    masks = {"x": kept_in, **{t.name: kept_out for t in outputs + tensors if t.name}}
    rewrite = AloneRewrite(masks, layer.out_axis, layer.out_rank)
    for n in nodes:
        handler_for(n.op, n.domain).rewrite(n, rewrite)
    ends = [tensors[i] for i in layer.ends]
    if layer.chain and layer.out_rank > 1:
        ends = [read_end(t, layer, i, nodes) for i, t in enumerate(ends)]
    ends = [t for t in ends + outputs[1:] if t.name]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=ends, opset=layer.opset)
    return gs.export_onnx(graph)


def read_end(tensor, layer: TimedLayer, i: int, nodes: list) -> gs.Variable:
    """A Slice of `tensor`'s first element along its last axis that is not the channels', added to `nodes`: its
    output is the timed model's, so that `tensor` is read as the next layer reads it in the whole model
    (onnxruntime fuses no activation whose output is a graph output: Conv + HardSwish stayed three nodes)."""
    axis = max(a for a in range(layer.out_rank) if a != layer.out_axis % layer.out_rank)
    bounds = [gs.Constant(f"end{i}_{n}", np.array([v], np.int64)) for n, v in (("starts", 0), ("ends", 1), ("axes", axis))]
    out = gs.Variable(f"end{i}", np.float32)
    nodes.append(gs.Node("Slice", f"end{i}", {}, [tensor, *bounds], [out]))
    return out


def time_layer(layer: TimedLayer, threads: int, timing: LatencyConfig = TIMING) -> LayerFit:
    """Time `layer` (with its chain where onnxruntime leaves some of it unfused) at `sample_counts` and fit it."""
    layer = unfused(layer)
    block = layer_block(layer)
    step = layer.blocks * block
    if min(layer.c_in, layer.c_out) // step < MIN_UNITS:  # too few points in units of the block: time it all
        step = layer.blocks
    k_in, k_out = sample_counts(layer.c_in, layer.c_out, layer.kind, step)
    rng = np.random.default_rng(0)
    ms = []
    for a, b in zip(k_in, k_out):
        model = layer_model(layer, int(a), int(b))
        feed = {"x": rng.standard_normal(layer.input_shape_at(int(a))).astype(np.float32)}
        seconds = time_runs({"layer": latency_session(model, threads)}, feed, timing, model_clock(threads))["layer"]
        ms.append(summarize(seconds)["median_ms"])
    fit = fit_layer(layer.name, layer.c_in, layer.c_out, k_in, k_out, ms, layer.kind)
    return replace(fit, block=block)


def optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` as onnxruntime's CPU optimizer leaves it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warning that an optimized model is hardware-specific
    with temp_folder("layout-") as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        build_session(model.SerializeToString(), options)
        return onnx.load(options.optimized_model_filepath)


def runs_blocked(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime's CPU optimizer moves some node of `model` into its blocked channel layout."""
    return any(node.domain == BLOCKED_DOMAIN for node in optimized(model).graph.node)


def unfused(layer: TimedLayer) -> TimedLayer:
    """`layer` with its chain when some step of it still runs as its own node after onnxruntime's fusions,
    else alone: a chain fused into its layer (Conv + BatchNormalization + HardSwish) timed with it made the
    rotation classifier's predicted speed-up overshoot the measured one by 15-19% (3-6% under, alone)."""
    if not layer.chain:
        return layer
    alone = replace(layer, chain=(), ends=(0,))
    try:
        nodes = optimized(layer_model(layer, layer.c_in, layer.c_out)).graph.node
    except Exception:  # noqa: BLE001 - onnxruntime's errors share no base class; the layer alone still times
        return alone
    return layer if len([n for n in nodes if n.op_type not in LAYOUT_OPS]) > 1 else alone


@functools.cache
def channel_block() -> int:
    """The channel block of onnxruntime's blocked layout on this machine (16 with AVX-512, 8 with AVX2; 1
    when its optimizer does not use the layout): read off the optimized graph of a Conv with 36 output
    channels, which onnxruntime pads up to a multiple of its block (an odd multiple of 4 tells 4, 8, 16 and
    32 apart). A layer cut to a count between multiples computes the padded channels all the same."""
    weight = onnx.numpy_helper.from_array(np.ones((36, 32, 1, 1), np.float32), "weight")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "weight"], ["y"])], "block",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 36, 8, 8])], [weight])
    model = optimized(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    shapes = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) == 4}
    padded = [shapes[n.input[1]] for n in model.graph.node if n.domain == BLOCKED_DOMAIN and n.op_type == "Conv"
              and n.input[1] in shapes]
    if not padded:
        return 1
    return next((m for m in sorted(MULTIPLES, reverse=True) if -(-36 // m) * m == padded[0]), 1)


def layer_block(layer: TimedLayer) -> int:
    """The smallest of `MULTIPLES` at whose odd multiples (so not by chance a multiple of the next) of kept
    channels on both sides onnxruntime still runs `layer` in its blocked layout; 1 when it never does, or
    when no multiple cuts it (too few channels)."""
    if not runs_blocked(layer_model(layer, layer.c_in, layer.c_out)):
        return 1
    b = layer.blocks
    for multiple in MULTIPLES:
        k_in, k_out = (b * min(c, multiple * (2 * (c * 3 // 8 // multiple) + 1)) for c in (layer.c_in // b, layer.c_out // b))
        if (k_in, k_out) == (layer.c_in, layer.c_out):
            continue  # nothing cut: the full layer, blocked, proves nothing
        if runs_blocked(layer_model(layer, k_in, k_out)):
            return multiple
    return 1


# ---------------------------------------------------------------- the cache


def machine() -> dict:
    import onnxruntime

    return {"node": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__}


def cache_key(layers: list[TimedLayer], threads: int) -> str:
    text = json.dumps({"layers": [layer.key() for layer in layers], "threads": threads, "machine": machine()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LatencyCache:
    """Layer fits in a JSON file, one entry per `cache_key`."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None

    def _entries(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("entries", {}) if data.get("version") == CACHE_VERSION else {}

    def get(self, key: str) -> list[LayerFit] | None:
        entry = self._entries().get(key)
        if entry is None:
            return None
        return [LayerFit(f["name"], f["c_in"], f["c_out"], f["multiple"], tuple(f["coef"]), f["kind"], f["block"])
                for f in entry]

    def put(self, key: str, fits: list[LayerFit]) -> None:
        if self.path is None:
            return
        entries = self._entries()
        entries[key] = [asdict(f) for f in fits]
        tmp = staging_path(self.path.parent, self.path.suffix)
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
        os.replace(tmp, self.path)


def layer_fits(layers: list[TimedLayer], threads: int, cache: LatencyCache, timer=time_layer,
               write: bool = True) -> tuple[list[LayerFit], bool]:
    """(a fit per layer, whether they came from the cache); `timer(layer, threads)` times one layer. New fits
    are written to the cache unless `write` is False (then `cache.put(cache_key(layers, threads), fits)`)."""
    key = cache_key(layers, threads)
    fits = cache.get(key)
    if fits is not None:
        return fits, True
    fits = [timer(layer, threads) for layer in layers]
    if write:
        cache.put(key, fits)
    return fits, False


def timed_layers(analysis) -> list[TimedLayer]:
    """The layers of the analysed graph that read or write prunable channels and can be timed alone."""
    prunable = {g.index for g in analysis.prunable_groups()}

    def carries(tensor) -> bool:  # some of its channels belong to a prunable group
        cmap = analysis.maps.get(tensor.name)
        return cmap is not None and bool(np.isin(analysis.group_of[analysis.label[cmap.ids.ravel()]], list(prunable)).any())

    layers = [(timed_layer(node, analysis.shapes, analysis.graph.opset), node) for node in analysis.graph.nodes
              if node.inputs and node.outputs and (carries(node.inputs[0]) or carries(node.outputs[0]))]
    return [with_chain(layer, node, analysis) for layer, node in layers if layer is not None]


def layer_label(node) -> str:
    """What names a graphsurgeon node's layer here and in the cost model: its name, or its first output's
    when it has none (exporters may leave every node unnamed; output names are unique)."""
    return node.name or node.outputs[0].name
