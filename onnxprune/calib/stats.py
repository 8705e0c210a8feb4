"""Running per-channel statistics of activations, folded batch by batch (memory: one batch)."""

from __future__ import annotations

import numpy as np

from ..runtime import batch_within, float_bytes

ACTIVATION_BUDGET_BYTES = 96 << 20  # exposed activations of one capture batch, all tensors together (onnxruntime
# needs about as much again for its own buffers; a batch is dropped before the next is computed)


class ChannelStats:
    """Sum of |a|, sum of a^2 and max |a| per position of `axis`, over every sample and other position."""

    def __init__(self, axis: int):
        self.axis = axis
        self.abs_sum = self.sq_sum = self.abs_max = None
        self.count = 0  # values folded per channel

    def update(self, batch: np.ndarray) -> None:
        axis = self.axis % batch.ndim
        others = tuple(a for a in range(batch.ndim) if a != axis)
        magnitude = np.abs(batch, dtype=np.float32)
        abs_sum = magnitude.sum(others, dtype=np.float64)
        sq_sum = np.square(magnitude).sum(others, dtype=np.float64)
        abs_max = magnitude.max(others) if magnitude.size else np.zeros(batch.shape[axis], np.float32)
        if self.abs_sum is None:
            self.abs_sum, self.sq_sum, self.abs_max = abs_sum, sq_sum, abs_max.astype(np.float64)
        else:
            self.abs_sum += abs_sum
            self.sq_sum += sq_sum
            np.maximum(self.abs_max, abs_max, out=self.abs_max)
        self.count += batch.size // batch.shape[axis]

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.sq_sum / max(self.count, 1))


def capture_batch_size(shapes: dict[str, tuple], names: list[str], requested: int | None,
                       fixed_batch: int | None = None) -> int:
    """Samples per capture batch: as asked, else as many as keep all `names`' activations under the budget."""
    if fixed_batch:
        return fixed_batch
    if requested:
        return requested
    return batch_within(ACTIVATION_BUDGET_BYTES, float_bytes(shapes, names))
