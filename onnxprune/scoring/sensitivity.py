"""How much a group's local reconstruction error matters at the model's outputs, measured.

The obs curves (scoring/obs.py) are the consumer layers' own relative errors. The same local error does
very different damage at the outputs: on the PP-OCR direction classifier, obs spent a 10% MAC cut on the
first layers (8 -> 4 channels of the stem), whose local error was small, and lost 21% of top-1 agreement
where an allocation that spared them lost 9%. Sensitivity analysis (Li et al. 2017, "Pruning Filters for
Efficient ConvNets", section 3.2: prune each layer alone and measure) answers it directly: for every
group, the model runs on held-out calibration samples with that group alone cut, at SHARES of its
channels, its consumer layers carrying the OBS-updated weights (what the recovery will re-fit), and the
squared relative error of its outputs is measured. The ratio to the local curve at those points (the
group's gain) rescales its curve, linearly interpolated in between, so the allocation compares output
errors per MAC.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..calib.capture import capture_session
from ..calib.data import CalibrationSet
from ..recover.layers import Initializers, layer_view, node_consumers
from ..recover.passes import held_out_samples
from ..validate.compare import run_model
from .consumers import flip_kernel

SHARES = (0.25, 0.5)  # of a group's channels removed where its output error is measured
SAMPLES = 32  # held-out calibration samples each measurement runs, at most ...
MIN_SAMPLES = 8  # ... and at least
BUDGET_PASSES = 8  # all measurements together run at most this many passes' worth of the calibration samples
TINY = 1e-12


def output_curves(model, calibration: CalibrationSet, fixed_batch: int | None, problems: dict[int, list],
                  orders: dict[int, np.ndarray], curves: dict[int, np.ndarray],
                  most_removed: dict[int, int]) -> tuple[dict[int, np.ndarray], int]:
    """Each group's curve (`curves[g][r]`: local error after removing its first r units of `orders[g]`)
    rescaled to the squared relative error of the model's outputs, measured with the group cut alone.
    `problems[g]`: its consumers as obs Problems; `most_removed[g]`: the largest cut the allocation may
    make. `model`: a ModelProto, or a file to load it from; it is not changed. Returns the curves and the
    samples each measurement ran."""
    original = model.load() if hasattr(model, "load") else model
    samples = _samples(calibration, fixed_batch, len(curves) * len(SHARES))
    batch = fixed_batch or 8
    reference = run_model(capture_session(original), samples, batch, label="sensitivity reference")
    scaled = {}
    for g, curve in curves.items():
        points = sorted({min(max(round(share * len(curve)), 1), most_removed[g]) for share in SHARES})
        points = [r for r in points if r >= 1]
        gains = []
        for removed in points:
            trial = _with_removal(original, problems[g], orders[g][:removed])
            error = _output_error(reference, run_model(capture_session(trial), samples, batch, label="sensitivity"))
            local = curve[removed]
            gains.append(error / local if local > TINY else 1.0)
        if not gains:
            scaled[g] = curve
            continue
        removed = np.arange(len(curve))
        scaled[g] = curve * np.interp(removed, [0, *points], [gains[0], *gains])
    return scaled, samples.count


def _samples(calibration: CalibrationSet, fixed_batch: int | None, measurements: int) -> CalibrationSet:
    """Held-out samples (absent from the Gram matrices the curves come from), as many as the budget gives
    each of `measurements`, whole batches of a fixed batch size."""
    pool = calibration if fixed_batch else held_out_samples(calibration)
    share = BUDGET_PASSES * calibration.count // max(measurements, 1)
    count = min(max(share, MIN_SAMPLES), SAMPLES, pool.count)
    if fixed_batch:
        count = max(count // fixed_batch, 1) * fixed_batch
    return pool.head(count)


def _with_removal(model: onnx.ModelProto, problems: list, units: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` whose consumers of the group read none of `units`, the rest re-fitted (OBS)."""
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    inits = Initializers(trial)
    consumers = node_consumers(trial)
    nodes = {node.output[0]: node for node in trial.graph.node}
    for problem in problems:
        updated = problem.copy()
        updated.remove(units)
        node = nodes[problem.consumer.node.outputs[0].name]
        if inits.uses.get(node.input[1], 0) != 1:
            continue  # a shared weight: left as it is
        view = layer_view(node, inits, consumers)
        if isinstance(view, str):
            continue
        _write_block(view, inits, problem, updated.weight)
    return trial


def _write_block(view, inits: Initializers, problem, weight: np.ndarray) -> None:
    """Write one conv block's [outputs, features + bias] weights (the obs layout) into the layer."""
    features = weight[:, :-1]
    layout = problem.consumer.layout
    if layout.transposed:  # obs reads a transposed conv with its kernel flipped
        features = flip_kernel(features.reshape((len(features), -1) + layout.kernel)).reshape(len(features), -1)
    matrix = view.weight.copy()
    matrix[problem.block] = features.T
    bias = None
    if view.bias is not None:
        bias = view.bias.current.copy() if not view.bias.additive else np.zeros_like(view.bias.current)
        per_block = matrix.shape[2]
        bias[problem.block * per_block:(problem.block + 1) * per_block] = weight[:, -1]
    view.write(inits, matrix, bias)


def _output_error(reference: dict, outputs: dict) -> float:
    """Mean over the floating-point outputs of the squared relative error."""
    errors = []
    for name, expected in reference.items():
        if not np.issubdtype(expected.dtype, np.floating):
            continue
        expected = expected.astype(np.float64)
        energy = float(np.sum(expected ** 2))
        if energy > 0:
            errors.append(float(np.sum((outputs[name].astype(np.float64) - expected) ** 2)) / energy)
    return float(np.mean(errors)) if errors else 0.0
