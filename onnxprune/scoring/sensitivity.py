"""How much a group's local reconstruction error matters at the model's outputs, measured.

The obs curves (scoring/obs.py) are the consumer layers' own relative errors. The same local error does
very different damage at the outputs: on the PP-OCR direction classifier, obs spent a 10% MAC cut on the
first layers (8 -> 4 channels of the stem), whose local error was small, and lost 21% of top-1 agreement
where an allocation that spared them lost 9%. Sensitivity analysis (Li et al. 2017, "Pruning Filters for
Efficient ConvNets", section 3.2: prune each layer alone and measure) answers it directly: for every
group, the model runs on held-out calibration samples with that group alone cut, at about SHARES of its
channels, its consumer layers carrying the OBS-updated weights (what the recovery will re-fit), and the
error of its outputs is measured: the squared relative error, or for a softmax output that of the log-odds
among the original's most probable classes (`log_odds_error`: on the PP-OCR direction classifier at 70% of
MACs, 0.888 -> 0.908 top-1 agreement over five seeds, the rotation classifier and the recognizer unchanged).
The ratio to the local curve at those points (the group's gain) rescales its curve, linearly interpolated
in between, so the allocation compares output errors per MAC.

One copy of the model is kept, with an explicit (zero) bias on every consumer that has none. The model
runs as a `Stream` (recover/stream.py): the groups are measured in the order of their first consumer, the
stream advances to it with the original weights, and a group's measurements run only the rest of the
graph from there, all on one session of that part whose changed weights and biases are its inputs (not
constants: onnxruntime's optimizers would fold a constant weight into a new one, the NCHWc layout
transformer, a Conv followed by Mul or Add, and a replacement given for it would be ignored). With the
greedy's compaction it took obs on ResNet-50 from 81.5 to 39.3 plain passes (README,
`bench/speed_recovery.py`); one session per group instead of one per measurement halved the sessions built.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..calib.data import CalibrationSet
from ..recover.layers import Initializers, LinearView, layer_view, node_consumers
from ..recover.passes import held_out_samples, output_error
from ..recover.stream import Stream
from ..validate.compare import joined
from .consumers import flip_kernel

SHARES = (0.25, 0.5)  # of a group's channels removed where its output error is measured
SAMPLES = 32  # held-out calibration samples each measurement runs, at most ...
MIN_SAMPLES = 8  # ... and at least
BUDGET_PASSES = 8  # all measurements together run at most this many passes' worth of the calibration samples
COMPETING_CLASSES = 5  # of a softmax output: the original's most probable classes, whose log-odds are measured
LOG_FLOOR = 1e-12  # probabilities below it are read as it (a log of 0 is no measure)
TINY = 1e-12


class OutputProbe:
    """The original model on held-out calibration samples, run with some consumers' weights replaced.
    A context manager: its stream's activations are released on exit."""

    def __init__(self, model, calibration: CalibrationSet, fixed_batch: int | None, layers: list[str],
                 measurements: int, samples: CalibrationSet | None = None):
        """`model`: a ModelProto, or a file to load it from (not changed); `layers`: the output names of the
        consumers whose weights may be replaced; `measurements`: how many (sets of weights given to `errors`)
        to budget for, unless the `samples` are given."""
        if hasattr(model, "load"):
            probe = model.load()
        else:
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
        inits = Initializers(probe)
        consumers = node_consumers(probe)
        nodes = {node.output[0]: node for node in probe.graph.node}
        self.views: dict[str, LinearView] = {}
        for name in layers:
            view = layer_view(nodes[name], inits, consumers)
            if isinstance(view, str) or any(inits.uses.get(n, 0) != 1 for n in _replaced_names(view)):
                continue  # not re-fittable, or a weight shared with another node: left as it is
            slot = view.bias
            if slot is not None and not slot.additive and slot.node.input[slot.index:slot.index + 1] in ([], [""]):
                slot.write(inits, slot.current, view.bias_shape(slot.current))  # a named zero bias to replace
            self.views[name] = view
        self.probe, self.inits = probe, inits
        self.samples = samples if samples is not None else _samples(calibration, fixed_batch, measurements)
        self.batch = fixed_batch or 8
        self.position = {node.output[0]: i for i, node in enumerate(probe.graph.node)}
        self.outputs = [o.name for o in probe.graph.output]
        self.stream = Stream(probe, self.samples, self.batch)
        self.early: dict[str, list[np.ndarray]] = {}  # outputs computed before the stream's frontier
        self.reference = self._rest(0, [])({})
        self.competing = competing_classes(self.reference)

    def __enter__(self) -> "OutputProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()

    def first_node(self, problems: list) -> int:
        """Where in the graph the first of the problems' layers is (measure groups in this order)."""
        return min(self.position[p.consumer.node.outputs[0].name] for p in problems)

    def errors(self, problems: list, weights: list[list[np.ndarray]]) -> list[float]:
        """The outputs' error (`_output_error`) with each problem's block given each of `weights` (a list
        per measurement, obs layout), all from one session of the graph from the first problem's layer on."""
        replaced = [self._initializers(problems, w) for w in weights]
        run = self._rest(self.first_node(problems), sorted({name for r in replaced for name in r}))
        return [_output_error(self.reference, run(r), self.competing) for r in replaced]

    def _rest(self, first: int, fed: list[str]):
        """A function giving the model's outputs on the samples with the initializers `fed` replaced by the
        values it is given (name -> values), which only nodes from index `first` on read."""
        self._advance(first)
        rest = [name for name in self.outputs if name not in self.early]
        evaluate = self.stream.evaluate(rest, fed)

        def run(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            chunks = {name: [] for name in rest}
            for batch in evaluate(values):
                for name in rest:
                    chunks[name].append(np.atleast_1d(batch[name]))
            return {name: joined(name, chunks[name] if name in chunks else self.early[name]) for name in self.outputs}

        return run

    def _advance(self, first: int) -> None:
        """Run the nodes before index `first` for good (with the original weights): the stream then holds
        the tensors the later nodes read. A frontier past `first` starts the stream again."""
        stream = self.stream
        if stream.done[first:].any():
            stream.close()
            self.stream = stream = Stream(self.probe, self.samples, self.batch)
            self.early = {}
        frontier = [name for reads in stream.reads[first:] for name in reads
                    if stream.producer.get(name, first) < first]
        ended = [name for name in self.outputs if stream.producer.get(name, first) < first and name not in self.early]
        wanted = list(dict.fromkeys([*frontier, *ended]))
        if not wanted:
            return
        chunks = {name: [] for name in ended}
        for batch in stream.run(wanted):
            for name in ended:
                chunks[name].append(np.atleast_1d(batch[name]))
        self.early.update(chunks)

    def _initializers(self, problems: list, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The replaced initializers: every changed layer's weight and bias tensors."""
        changed: dict[str, tuple[LinearView, np.ndarray, np.ndarray | None]] = {}
        for problem, weight in zip(problems, weights):
            view = self.views.get(problem.consumer.node.outputs[0].name)
            if view is None:
                continue
            if view.output not in changed:
                bias = None if view.bias is None else (
                    np.zeros_like(view.bias.current) if view.bias.additive else view.bias.current.copy())
                changed[view.output] = (view, view.weight.copy(), bias)
            _, matrix, bias = changed[view.output]
            _set_block(matrix, bias, problem, weight)
        arrays = {}
        for view, matrix, bias in changed.values():
            arrays[view.node.input[1]] = view.weight_values(matrix)
            if bias is not None:
                slot = view.bias
                arrays[slot.node.input[slot.index]] = slot.values(self.inits, bias, view.bias_shape(bias))
        return {name: np.ascontiguousarray(a, dtype=self.inits.get(name).dtype) for name, a in arrays.items()}


def _replaced_names(view: LinearView) -> list[str]:
    """The initializers a measurement replaces for this layer (a missing bias gets a name of its own)."""
    slot = view.bias
    bias = [] if slot is None else slot.node.input[slot.index:slot.index + 1]
    return [view.node.input[1], *(name for name in bias if name)]


def _set_block(matrix: np.ndarray, bias: np.ndarray | None, problem, weight: np.ndarray) -> None:
    """Write one conv block's [outputs, features + bias] weights (the obs layout) into the layer's
    [groups, features, outputs per group] matrix and its bias."""
    features = weight[:, :-1]
    layout = problem.consumer.layout
    if layout.transposed:  # obs reads a transposed conv with its kernel flipped
        features = flip_kernel(features.reshape((len(features), -1) + layout.kernel)).reshape(len(features), -1)
    matrix[problem.block] = features.T
    if bias is not None:
        per_block = matrix.shape[2]
        bias[problem.block * per_block:(problem.block + 1) * per_block] = weight[:, -1]


def measured_points(channels: int, batch: int, most_removed: int) -> list[int]:
    """Removal counts to measure a group at: the batch ends (multiples of `batch`) nearest to SHARES of
    its channels, at most `most_removed`."""
    ends = [min(max(round(share * channels / batch), 1) * batch, most_removed // batch * batch) for share in SHARES]
    return sorted({r for r in ends if r >= 1})


def rescaled(curve: np.ndarray, points: list[int], errors: list[float]) -> np.ndarray:
    """`curve` times the gain (measured error / curve) at `points`, linearly interpolated between them
    (constant before the first and after the last)."""
    if not points:
        return curve
    gains = [error / curve[r] if curve[r] > TINY else 1.0 for r, error in zip(points, errors)]
    return curve * np.interp(np.arange(len(curve)), points, gains)


def _samples(calibration: CalibrationSet, fixed_batch: int | None, measurements: int) -> CalibrationSet:
    """Held-out samples (absent from the Gram matrices the curves come from), as many as the budget gives
    each of `measurements`, whole batches of a fixed batch size, spread over the set (the first ones of a
    folder read photos first were mostly photos: bench/eval_scoring.py's `obs[first]` column measures it).
    A fixed batch above 1 draws from every sample (the held-out ones need not fill whole batches); of 1, from
    the held-out ones, as a dynamic batch does."""
    pool = held_out_samples(calibration, fixed_batch)
    share = BUDGET_PASSES * calibration.count // max(measurements, 1)
    count = min(max(share, MIN_SAMPLES), SAMPLES, pool.count)
    if fixed_batch:
        count = max(count // fixed_batch, 1) * fixed_batch
    return pool.spread(count)


def competing_classes(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For every softmax output (at least two classes on its last axis, samples on others; non-negative, each
    sample summing to one; an output normalised so by other means is read as one too): the indices of the
    original's COMPETING_CLASSES (at least two) most probable classes of each sample (all when it has no more)."""
    wanted = max(COMPETING_CLASSES, 2)  # one class has no log-odds
    competing = {}
    for name, p in reference.items():
        if not np.issubdtype(p.dtype, np.floating) or p.ndim < 2 or p.shape[-1] < 2 or p.size == 0 or p.min() < 0:
            continue
        if not np.allclose(p.sum(-1), 1.0, atol=1e-3):
            continue
        classes = p.shape[-1]
        if classes <= wanted:
            competing[name] = np.broadcast_to(np.arange(classes), p.shape)
        else:  # a copy: the slice of argpartition's whole index array would keep it (136 MB on the recognizer)
            competing[name] = np.argpartition(p, classes - wanted, axis=-1)[..., classes - wanted:].astype(np.int32)
    return competing


def log_odds_error(expected: np.ndarray, actual: np.ndarray, classes: np.ndarray) -> float:
    """The squared relative error of a softmax output's log-probabilities at `classes` (per sample), centred
    over them: the differences of the logits that compete for the argmax. The squared error of the
    probabilities shrinks a change by p (1 - p), so it hardly sees a confident sample's margin move, and over
    every class the floored log-probabilities of thousands of unlikely ones (a text recognizer's) outweigh
    the few that compete."""
    a = np.log(np.maximum(np.take_along_axis(expected, classes, -1).astype(np.float64), LOG_FLOOR))
    b = np.log(np.maximum(np.take_along_axis(actual, classes, -1).astype(np.float64), LOG_FLOOR))
    a -= a.mean(-1, keepdims=True)
    b -= b.mean(-1, keepdims=True)
    energy = float(np.sum(a * a))
    if energy <= TINY * a.size:  # the original sure of nothing (its classes equally likely): the change itself
        return float(np.mean((a - b) ** 2))
    return float(np.sum((a - b) ** 2) / energy)


def _output_error(reference: dict, outputs: dict, competing: dict[str, np.ndarray]) -> float:
    """Mean over the floating-point outputs (not all zero) of their error: the log-odds error among the
    competing classes of a softmax output (`competing_classes`), the squared relative error of any other."""
    errors = [log_odds_error(expected, outputs[name], competing[name]) if name in competing
              else output_error(expected, outputs[name]) ** 2 for name, expected in reference.items()
              if np.issubdtype(expected.dtype, np.floating) and np.any(expected)]
    return float(np.mean(errors)) if errors else 0.0
