"""Bias correction: shift each output channel of a layer by its mean error on the calibration data.

The cheapest recovery: the weights stay, and the per-channel mean of (original output - pruned output)
is added to the layer's bias, which removes the systematic shift that pruning leaves behind. Only
per-channel sums are accumulated (all output positions, no sampling).
"""

from __future__ import annotations

import numpy as np

from ..calib.data import held_out_rows
from .lstsq import Update, relative


class BiasFit:
    needs_outputs = True  # the layer's own output with its current weights, every batch
    to_check = None  # (no self-check)

    def __init__(self, view, seed: int = 0, hold_out: bool = False, **_):
        self.view = view
        self.hold_out = hold_out  # leave the held-out samples (calib.data.held_out) out of the shift
        self.seen = 0  # samples so far
        channels = view.weight.shape[0] * view.weight.shape[2]
        self.count = 0
        self.diff_sum = np.zeros(channels)
        self.diff_sq = 0.0
        self.energy = 0.0

    def add_parts(self, x: np.ndarray, y_pruned: np.ndarray, y_target: np.ndarray) -> list:
        """`add`, with nothing left to do afterwards (LstsqFit.add_parts's protocol)."""
        self.add(x, y_pruned, y_target)
        return []

    def add(self, x: np.ndarray, y_pruned: np.ndarray, y_target: np.ndarray) -> None:
        rows = slice(None)
        target = self.view.outputs(y_target, rows).astype(np.float64)
        if self.view.out_mask is not None:
            target = target[:, self.view.out_mask]
        diff = target - self.view.outputs(y_pruned, rows)
        if self.hold_out:  # rows are sample-major: each sample's output positions in turn
            fit = ~held_out_rows(np.arange(diff.shape[0]), diff.shape[0], y_pruned.shape[0], self.seen)
            diff, target = diff[fit], target[fit]
        self.seen += y_pruned.shape[0]
        self.count += diff.shape[0]
        self.diff_sum += diff.sum(0)
        self.diff_sq += float(np.sum(diff * diff))
        self.energy += float(np.sum(target * target))

    def finish(self) -> Update:
        before = relative(self.diff_sq, self.energy)
        if self.view.bias is None:
            return Update(None, None, before, before, "skipped: the layer has no per-channel bias to correct")
        shift = self.diff_sum / max(self.count, 1)
        after = relative(max(self.diff_sq - self.count * float(np.sum(shift * shift)), 0.0), self.energy)
        if not np.isfinite(shift).all() or not after < before:
            return Update(None, None, before, before, "kept: the shift did not lower the error")
        return Update(None, self.view.bias.current + shift, before, after)
