"""A model run piece by piece over the calibration data: the activations at the frontier are kept, and
each step runs only the nodes between the frontier and the tensors asked for.

Recovery walks a model level by level; re-running the model from its inputs at every level costs depth
squared. A `Stream` keeps, for every calibration batch, the tensors that nodes not yet run still need
(in memory up to a budget, in a temporary folder beyond it), so each node runs once per stream (nodes run
`provisional`ly, as bias correction's layers with their old weights, run again with their new ones).

Tensors are kept per batch, as onnxruntime produced them: no assumption is made about which axis is the
batch (a Shape output, an LSTM's [steps, batch, ...] state).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
import onnxruntime as ort

from ..calib.capture import capture_session
from ..calib.data import CalibrationSet
from ..runtime import EXTERNAL_ABOVE_BYTES
from ..workdir import temp_folder

MEMORY_BUDGET_BYTES = 1 << 30  # frontier activations held in memory per stream; the rest goes to disk
SHARED_ABOVE_ELEMENTS = 1024  # `evaluate` hands onnxruntime initializers this large as arrays


class ActivationStore:
    """Arrays by (batch, name), in memory up to `budget` bytes, then as .npy files read back mapped."""

    def __init__(self, budget: int = MEMORY_BUDGET_BYTES):
        self.budget, self.in_memory = budget, 0
        self.arrays: dict[tuple[int, str], np.ndarray] = {}
        self.folder: tempfile.TemporaryDirectory | None = None
        self.files = 0

    def put(self, batch: int, name: str, array: np.ndarray) -> None:
        self.drop(batch, name)
        if self.in_memory + array.nbytes <= self.budget:
            self.arrays[batch, name] = array
            self.in_memory += array.nbytes
            return
        if self.folder is None:
            self.folder = temp_folder("stream-")
        self.files += 1
        path = Path(self.folder.name) / f"{self.files}.npy"
        np.save(path, array)
        self.arrays[batch, name] = np.load(path, mmap_mode="r")

    def get(self, batch: int, name: str) -> np.ndarray:
        return self.arrays[batch, name]

    def has(self, name: str) -> bool:
        return (0, name) in self.arrays

    def drop(self, batch: int, name: str) -> None:
        array = self.arrays.pop((batch, name), None)
        if array is None:
            return
        if isinstance(array, np.memmap):
            path = Path(array.filename)
            del array
            path.unlink(missing_ok=True)
        else:
            self.in_memory -= array.nbytes

    def close(self) -> None:
        self.arrays.clear()
        self.in_memory = 0
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def short_lived_session(piece: onnx.ModelProto, external: dict | None = None):
    """A session of one step's piece, or of a model run once (recovery's final check): read from memory when
    small and whole (no temporary file written and removed for every step; it lives for one step), else from a
    file as any model (weights mapped from a data file are written out by `io.write_model`). Serialized once:
    `ByteSize` first cost as much again (10% of obs's output probe on ResNet-50, bench/speed_recovery.py)."""
    if external:  # its large weights are references to arrays handed over (Stream.evaluate)
        return capture_session(piece.SerializeToString(), external)
    mapped = any(t.data_location == onnx.TensorProto.EXTERNAL for t in piece.graph.initializer)
    if not mapped and _initializer_bytes(piece) < EXTERNAL_ABOVE_BYTES:
        data = piece.SerializeToString()
        if len(data) < EXTERNAL_ABOVE_BYTES:
            return capture_session(data)
    return capture_session(piece)


def _initializer_bytes(piece: onnx.ModelProto) -> int:
    """The initializers' size from their shapes (without touching their data)."""
    return sum(int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in piece.graph.initializer)


def _shared_reference(tensor: onnx.TensorProto, shared: dict) -> onnx.TensorProto:
    """A large initializer as external data whose values onnxruntime is given from `shared` (filled here,
    read from the model now: a weight changed since is read as changed); a small one as it is."""
    if int(np.prod(tensor.dims)) < SHARED_ABOVE_ELEMENTS or tensor.data_type == onnx.TensorProto.STRING:
        return tensor
    values = numpy_helper.to_array(tensor)
    if values.dtype.kind not in "biuf":  # bfloat16, float8: numpy cannot hand them over
        return tensor
    shared[tensor.name] = ort.OrtValue.ortvalue_from_numpy(values)
    reference = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                 data_location=onnx.TensorProto.EXTERNAL)
    reference.external_data.add(key="location", value="onnxprune-shared")  # never read: given as a value
    return reference


def _outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (If, Loop, Scan) read, from the outer scope or their own."""
    names = []
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
            for sub in graph.node:
                names.extend(sub.input)
                names.extend(_outer_reads(sub))
    return names


class Stream:
    """`model` evaluated on `calibration` step by step; `model`'s initializers may change between steps
    for nodes not yet run (recovery writes re-fitted weights before their layers run for good)."""

    def __init__(self, model: onnx.ModelProto, calibration: CalibrationSet, batch_size: int,
                 budget: int = MEMORY_BUDGET_BYTES):
        self.model = model
        self.nodes = list(model.graph.node)
        self.reads = [list(n.input) + _outer_reads(n) for n in self.nodes]
        self.producer = {name: i for i, n in enumerate(self.nodes) for name in n.output if name}
        self.readers: dict[str, list[int]] = {}
        for i, names in enumerate(self.reads):
            for name in set(names):
                self.readers.setdefault(name, []).append(i)
        self.done = np.zeros(len(self.nodes), dtype=bool)
        self.precomputed: Counter[str] = Counter()  # hand-outs still to come of tensors `precompute` kept
        # `evaluate` hands onnxruntime the large weights as arrays (not serialized into its piece and parsed
        # again: 40% of obs's output probe on ResNet-50), where all are in memory
        self.weights_in_memory = not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        self.store = ActivationStore(budget)
        self.batches = 0
        for b, feed in enumerate(calibration.batches(batch_size)):
            for name, array in feed.items():
                self.store.put(b, name, array)
            self.batches = b + 1

    def close(self) -> None:
        self.store.close()

    def _available(self, name: str) -> bool:
        return name == "" or name not in self.producer or self.store.has(name)

    def _needed_nodes(self, wanted: list[str]) -> list[int]:
        """Nodes not yet run that compute `wanted` from the frontier, in graph order."""
        needed, stack = set(), list(wanted)
        while stack:
            name = stack.pop()
            if self._available(name):
                continue
            i = self.producer[name]
            if i not in needed:
                needed.add(i)
                stack.extend(self.reads[i])
        return sorted(needed)

    def _piece(self, nodes: list[int], outputs: list[str], fed: frozenset[str] = frozenset(),
               shared: dict | None = None) -> onnx.ModelProto:
        """The nodes as a model reading the frontier tensors they need and giving `outputs`; the
        initializers named in `fed` become inputs of the piece instead. With a `shared` dict, large
        initializers are references to values put in it (see `_shared_reference`)."""
        graph = self.model.graph
        produced = {name for i in nodes for name in self.nodes[i].output}
        # read the nodes' inputs now: recovery may have renamed a weight since the stream began
        reads = {name for i in nodes for name in [*self.nodes[i].input, *_outer_reads(self.nodes[i])]} - produced - {""}
        initializers = [_shared_reference(t, shared) if shared is not None else t
                        for t in graph.initializer if t.name in reads and t.name not in fed]
        sample = {name: self.store.get(0, name) for name in reads if self.store.has(name)}
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
                  for name, a in sorted(sample.items())]
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in graph.initializer if t.name in reads and t.name in fed]
        piece = helper.make_model(
            helper.make_graph([self.nodes[i] for i in nodes], "piece", inputs,
                              [helper.make_empty_tensor_value_info(name) for name in outputs],
                              initializer=initializers, sparse_initializer=[
                                  t for t in graph.sparse_initializer if t.values.name in reads]),
            opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        piece.functions.extend(self.model.functions)
        return piece

    def _still_read(self, name: str, done: np.ndarray) -> bool:
        readers = self.readers.get(name, [])
        return bool(readers) and not done[readers].all()

    def run(self, wanted: list[str], provisional: frozenset[int] = frozenset()) -> Iterator[dict[str, np.ndarray]]:
        """Yield `{name: array}` of `wanted` for every batch, in order, running only the nodes still
        needed. Nodes in `provisional` (indices) run now but count as not run afterwards: their outputs
        are not kept and their inputs are, so they run again later with the weights they have then."""
        nodes = self._needed_nodes(wanted)
        done_after = self.done.copy()
        done_after[nodes] = True
        done_after[sorted(provisional)] = False
        produced = [name for i in nodes for name in self.nodes[i].output if name]
        keep = [name for name in produced if self.producer[name] not in provisional
                and (self._still_read(name, done_after) or name in self.precomputed)]
        to_compute = list(dict.fromkeys([*(n for n in wanted if not self.store.has(n)), *keep]))
        feeds = sorted({name for i in nodes for name in self.reads[i]} - set(produced) - {""})
        feeds = [name for name in feeds if self.store.has(name)]
        session = short_lived_session(self._piece(nodes, to_compute)) if to_compute else None
        self.done = done_after
        release = [name for name in feeds if not self._still_read(name, done_after) and name not in self.precomputed]
        handed = [name for name in dict.fromkeys(wanted) if self.precomputed[name] and self.store.has(name)]
        self.precomputed.subtract(handed)
        release += [name for name in handed if not self.precomputed[name] and not self._still_read(name, done_after)]
        self.precomputed = +self.precomputed  # (without the names handed out for the last time)
        for b in range(self.batches):
            computed = {}
            if session is not None:
                feed = {name: np.asarray(self.store.get(b, name)) for name in feeds}
                computed = dict(zip(to_compute, session.run(to_compute, feed)))
            result = {name: computed[name] if name in computed else np.asarray(self.store.get(b, name))
                      for name in wanted}
            for name in keep:  # before yielding: a caller zipping two streams stops after one's last batch
                self.store.put(b, name, computed[name])
            for name in release:
                self.store.drop(b, name)
            yield result

    def precompute(self, names: list[str]) -> None:
        """Compute `names` now, with every node they need, and keep them for the later calls that ask for them:
        one session and one run per batch where those calls would each build and run their own. `names` holds
        a tensor once per call that will ask for it; after the last it is dropped. For a model whose weights
        no longer change (recovery's original model: the targets of the next levels)."""
        fresh = [name for name in dict.fromkeys(names) if not self.store.has(name)]
        self.precomputed.update(names)
        for _ in self.run(fresh):
            pass

    def evaluate(self, wanted: list[str], fed: list[str]) -> Callable[[dict[str, np.ndarray]], Iterator[dict]]:
        """A function giving `{name: array}` of `wanted` for every batch, computed by the nodes not yet run
        with the initializers `fed` replaced by the values it is given (name -> array). One session serves
        every call (`fed` are inputs of its piece, not constants: onnxruntime cannot fold them into other
        weights, so the values given are the values used); the stream itself is not advanced. The piece's
        other large weights are handed over as arrays read when it is called (`_shared_reference`)."""
        nodes = self._needed_nodes(wanted)
        to_compute = [name for name in dict.fromkeys(wanted) if not self.store.has(name)]
        produced = {name for i in nodes for name in self.nodes[i].output if name}
        reads = {name for i in nodes for name in self.reads[i]} - produced - {""}
        feeds = sorted(name for name in reads if self.store.has(name))
        fed = sorted(set(fed) & reads)
        session = None
        if to_compute:
            shared = {} if self.weights_in_memory else None
            session = short_lived_session(self._piece(nodes, to_compute, frozenset(fed), shared), shared)

        def run(values: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
            for b in range(self.batches):
                computed = {}
                if session is not None:
                    feed = {name: np.asarray(self.store.get(b, name)) for name in feeds}
                    feed.update((name, values[name]) for name in fed)
                    computed = dict(zip(to_compute, session.run(to_compute, feed)))
                yield {name: computed[name] if name in computed else np.asarray(self.store.get(b, name))
                       for name in wanted}

        return run
