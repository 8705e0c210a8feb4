"""A measured latency model: each prunable layer's onnxruntime CPU time as a function of its kept input and
output channels, fitted to timings of the layer alone.

Each Conv/Gemm/MatMul with a constant weight (one group, not transposed) is built as a one-node model at
the analysed input shape and timed (`LatencyConfig`-style interleaved runs, median) at a few channel
counts: all, and for each side at a multiple of 8 below 3/4 of the channels and one channel fewer, at
one below 1/2 and 1, 5 and 9 channels fewer (which tells steps of 4, 8 and 16 apart), plus both sides at
half. The fit (`fit_layer`) is, for the multiple m among `MULTIPLES` that fits
best, time = a + b pin pout + c pin + d pout, with pin = ceil(k_in / m) m / C_in (pout likewise): the
product term is compute, the single terms memory traffic, and m the step at which the kernels change.

Fits are cached in a JSON file (`LatencyCache`) keyed by the layers (names, shapes, attributes), the
thread count and the machine, so a `--plan-in` run or a sweep beside the same output reuses them and a
different shape or thread count measures anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..ops import weighted
from ..workdir import staging_path
from .latency import LatencyConfig, latency_session, summarize, time_runs

MULTIPLES = (1, 4, 8, 16, 32)
TIMING = LatencyConfig(runs=7, warmup=2)
CACHE_VERSION = 1
TIMED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerFit:
    """One layer's time in ms: `coef` . [1, pin pout, pin, pout] at step `multiple` (see the module docstring)."""

    name: str
    c_in: int
    c_out: int
    multiple: int
    coef: tuple[float, float, float, float]

    def predict(self, k_in, k_out) -> np.ndarray:
        return features(k_in, k_out, self.c_in, self.c_out, self.multiple) @ np.asarray(self.coef)


def features(k_in, k_out, c_in: int, c_out: int, multiple: int) -> np.ndarray:
    """[points, 4]: 1, pin pout, pin, pout with the kept counts padded up to `multiple`."""
    p_in = np.minimum(np.ceil(np.asarray(k_in, dtype=np.float64) / multiple) * multiple, c_in) / c_in
    p_out = np.minimum(np.ceil(np.asarray(k_out, dtype=np.float64) / multiple) * multiple, c_out) / c_out
    p_in, p_out = np.broadcast_arrays(p_in, p_out)
    return np.stack([np.ones_like(p_in), p_in * p_out, p_in, p_out], axis=-1)


def fit_layer(name: str, c_in: int, c_out: int, k_in, k_out, ms) -> LayerFit:
    """The least-squares fit of the multiple in `MULTIPLES` (up to the smaller side) with the smallest
    residual; a larger multiple must cut it by a tenth to be chosen over a smaller one."""
    ms = np.asarray(ms, dtype=np.float64)
    best = None
    for multiple in (m for m in MULTIPLES if m <= max(1, min(c_in, c_out))):
        x = features(k_in, k_out, c_in, c_out, multiple)
        coef = np.linalg.lstsq(x, ms, rcond=None)[0]
        residual = float(np.sum((x @ coef - ms) ** 2))
        if best is None or residual < 0.9 * best[0]:
            best = (residual, multiple, coef)
    return LayerFit(name, int(c_in), int(c_out), best[1], tuple(float(c) for c in best[2]))


def sample_counts(c_in: int, c_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(k_in, k_out) at which a layer is timed: see the module docstring."""
    points = {(c_in, c_out), (max(1, c_in // 2), max(1, c_out // 2))}
    for fraction, below in ((0.75, (0, 1)), (0.5, (0, 1, 5, 9))):
        for c, side in ((c_in, 0), (c_out, 1)):
            k = int(c * fraction) // 8 * 8 or max(1, int(c * fraction))
            for kept in {max(1, k - d) for d in below}:
                points.add((kept, c_out) if side == 0 else (c_in, kept))
    k_in, k_out = np.array(sorted(points)).T
    return k_in, k_out


# ---------------------------------------------------------------- timing one layer alone


@dataclass(frozen=True)
class TimedLayer:
    """What is needed to build a layer alone at other channel counts."""

    name: str
    op: str
    attrs: dict
    input_shape: tuple
    weight_shape: tuple
    data_axis: int
    in_axis: int
    out_axis: int
    bias: bool
    opset: int

    @property
    def c_in(self) -> int:
        return self.input_shape[self.data_axis]

    @property
    def c_out(self) -> int:
        return self.weight_shape[self.out_axis]

    def input_shape_at(self, k_in: int) -> list:
        """The input's shape with `k_in` channels."""
        shape = list(self.input_shape)
        shape[self.data_axis] = k_in
        return shape

    def key(self) -> list:
        return [self.name, self.op, sorted((k, repr(v)) for k, v in self.attrs.items()), list(self.input_shape),
                list(self.weight_shape)]


def timed_layer(node, shapes: dict, opset: int) -> TimedLayer | None:
    """The layer of a graphsurgeon node when it can be timed alone (see the module docstring), else None."""
    if node.op not in TIMED_OPS or len(node.inputs) < 2 or not hasattr(node.inputs[1], "values"):
        return None
    shape = shapes.get(node.inputs[0].name)
    found = weighted(node.op, node.attrs, node.inputs[1].shape)
    if found is None or shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    layout = found[1]
    if layout.groups != 1 or layout.transposed or len(layout.shape) < 2:
        return None
    data_axis = layout.data_axis % len(shape)
    if shape[data_axis] != layout.in_channels:
        return None
    return TimedLayer(layer_label(node), node.op, dict(node.attrs), tuple(int(d) for d in shape), tuple(layout.shape),
                      data_axis, layout.in_axis % len(layout.shape), layout.out_axis % len(layout.shape),
                      len(node.inputs) > 2, opset)


def layer_model(layer: TimedLayer, k_in: int, k_out: int) -> onnx.ModelProto:
    """The layer alone with `k_in` input and `k_out` output channels, random weights."""
    rng = np.random.default_rng(0)
    weight_shape = list(layer.weight_shape)
    weight_shape[layer.in_axis], weight_shape[layer.out_axis] = k_in, k_out
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), "w")]
    if layer.bias:
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(k_out).astype(np.float32), "b"))
    node = helper.make_node(layer.op, ["x", "w", "b"][:len(inits) + 1], ["y"], **layer.attrs)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, layer.input_shape_at(k_in))
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", layer.opset)])


def time_layer(layer: TimedLayer, threads: int, timing: LatencyConfig = TIMING) -> LayerFit:
    """Time `layer` alone at `sample_counts` and fit it."""
    k_in, k_out = sample_counts(layer.c_in, layer.c_out)
    rng = np.random.default_rng(0)
    ms = []
    for a, b in zip(k_in, k_out):
        model = layer_model(layer, int(a), int(b))
        feed = {"x": rng.standard_normal(layer.input_shape_at(int(a))).astype(np.float32)}
        seconds = time_runs({"layer": latency_session(model, threads)}, feed, timing)["layer"]
        ms.append(summarize(seconds)["median_ms"])
    return fit_layer(layer.name, layer.c_in, layer.c_out, k_in, k_out, ms)


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
        return [LayerFit(f["name"], f["c_in"], f["c_out"], f["multiple"], tuple(f["coef"])) for f in entry]

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
    """The layers of the analysed graph that create prunable channels and can be timed alone."""
    sources = {id(s.node) for g in analysis.prunable_groups() for s in g.sources}
    layers = [timed_layer(node, analysis.shapes, analysis.graph.opset) for node in analysis.graph.nodes
              if id(node) in sources]
    return [layer for layer in layers if layer is not None]


def layer_label(node) -> str:
    """What names a graphsurgeon node's layer here and in the cost model: its name, or its first output's
    when it has none (exporters may leave every node unnamed; output names are unique)."""
    return node.name or node.outputs[0].name
