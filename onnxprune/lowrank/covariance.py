"""Input second moments E[x^T x] of every candidate layer, from one streaming pass over calibration data.

All layers' input tensors are captured in the same onnxruntime pass (`calib.capture.stream_activations`)
and each batch is folded into running sums, so memory is one batch of activations plus one [in, in]
matrix per layer. A Conv's features are its im2col patches: a seeded sample of output positions (the
same for every batch) is gathered with one fancy-indexing step per batch, never a loop over pixels.
Rows of big MatMul inputs are subsampled the same way.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..calib import CalibrationSet
from ..calib.capture import stream_activations
from ..runtime import batch_within, float_bytes
from .layers import Layer

log = logging.getLogger(__name__)

MAX_FEATURES = 2304  # larger inputs (256 channels x 3x3) get a weight-only SVD: [in, in] statistics cost too much
POSITIONS_PER_SAMPLE = 32  # conv output positions sampled per sample per batch
MAX_ROWS = 4096  # MatMul/Gemm rows used per batch
CAPTURE_BYTES = 256 << 20  # activations held per batch, at most (bounded below by one sample)


class Moment:
    """Running E[x^T x] of one layer's input features."""

    def __init__(self, layer: Layer, rng: np.random.Generator):
        self.layer = layer
        self.sum = np.zeros((layer.in_features, layer.in_features))
        self.rows = 0
        self.rng = rng
        self.samplers: dict[tuple, PatchSampler] = {}  # by spatial size: calibration data may differ from analysis

    def add(self, activation: np.ndarray) -> None:
        features = self._patches(activation) if self.layer.op == "Conv" else self._rows(activation)
        features = features.astype(np.float32, copy=False)  # float32 product, float64 running sum
        self.sum += features.T @ features
        self.rows += len(features)

    def _patches(self, activation: np.ndarray) -> np.ndarray:
        spatial = activation.shape[2:]
        if spatial not in self.samplers:
            self.samplers[spatial] = PatchSampler(self.layer, activation.shape, self.rng)
        return self.samplers[spatial].patches(activation)

    def _rows(self, activation: np.ndarray) -> np.ndarray:
        rows = activation.T if self.layer.input_transposed else activation.reshape(-1, activation.shape[-1])
        if len(rows) > MAX_ROWS:
            rows = rows[np.sort(self.rng.choice(len(rows), MAX_ROWS, replace=False))]
        return rows

    def value(self) -> np.ndarray:
        return self.sum / max(self.rows, 1)


class PatchSampler:
    """im2col rows of a Conv at a fixed random sample of output positions (the op handler's patches)."""

    def __init__(self, layer: Layer, input_shape: tuple, rng: np.random.Generator):
        self.layer = layer
        self.out = layer.handler.output_spatial(layer.layout, layer.conv_attrs, [int(d) for d in input_shape[2:]])
        total = int(np.prod(self.out))
        self.chosen = np.arange(total) if total <= POSITIONS_PER_SAMPLE else np.sort(
            rng.choice(total, POSITIONS_PER_SAMPLE, replace=False))

    def patches(self, x: np.ndarray) -> np.ndarray:
        """[batch * P, c_in * prod(kernel)] patches of `x` [batch, c_in, *spatial], sample-major."""
        total = int(np.prod(self.out))
        rows = (np.arange(len(x))[:, None] * total + self.chosen[None, :]).reshape(-1)
        layer = self.layer
        out_shape = (len(x), layer.out_features, *self.out)
        return layer.handler.input_rows(layer.layout, layer.conv_attrs, x, out_shape, rows).reshape(len(rows), -1)


def input_moments(model: onnx.ModelProto, layers: list[Layer], shapes: dict[str, tuple],
                  calibration: CalibrationSet, max_batch: int, seed: int,
                  max_features: int = MAX_FEATURES) -> dict[str, np.ndarray]:
    """E[x^T x] of each layer's input features, by layer name, in one pass over `calibration` (layers of
    more than `max_features` features are left out)."""
    rng = np.random.default_rng(seed)
    too_wide = [layer.name for layer in layers if layer.in_features > max_features]
    if too_wide:
        log.info("%d layers have more than %d input features: they use the weights only (%s, ...)",
                 len(too_wide), max_features, too_wide[0])
    moments, key_of = {}, {}  # layers reading the same features (Q, K and V projections) share one
    for layer in layers:
        if layer.in_features > max_features:
            continue
        key = (layer.input_name, layer.op == "Conv", layer.kernel, repr(sorted(layer.conv_attrs.items())),
               layer.input_transposed)
        if key not in moments:
            moments[key] = Moment(layer, rng)
        key_of[layer.name] = key
    if not moments:
        return {}
    names = sorted({m.layer.input_name for m in moments.values()})
    for activations in stream_activations(model, names, calibration, batch_within(CAPTURE_BYTES, float_bytes(shapes, names), max_batch),
                                          progress="low-rank calibration"):
        for moment in moments.values():
            moment.add(activations[moment.layer.input_name])
    values = {key: moment.value() for key, moment in moments.items()}
    return {name: values[key] for name, key in key_of.items()}

