"""Which weights of a layer go, and the optimal update of the rest (Optimal Brain Compression, Frantar &
Alistarh 2022; SparseGPT, Frantar & Alistarh 2023).

A layer is `y = W x` with W [outputs, features] and H = E[x x^T] (+ damping) from the calibration data.
Zeroing weight (i, j) alone and re-fitting the rest of row i raises row i's squared output error by the
OBS saliency w_ij^2 / [H^-1]_jj (the reconstruction-aware cost); without data the cost is w_ij^2
(magnitude, Han et al. 2015). Given a keep mask, each row's optimal update is the least-squares fit of
its kept weights to its own output: with D the dropped and K the kept features,

    w_K <- w_K + (H_KK)^-1 H_KD w_D,   w_D <- 0

solved for all rows at once as a batch of systems (rows in chunks bounded by `SOLVE_BYTES`).
"""

from __future__ import annotations

import numpy as np

from ..scoring.obs import damped, damped_inverse, quadratic

SOLVE_BYTES = 256 << 20  # the [rows, features, features] systems solved at once
EXACT_FEATURES = 2304  # above, the exact per-row solve (rows x features^3) gives way to `sequential_update`
BLOCK = 128  # columns per lazy batch of `sequential_update`


def weight_costs(weight: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
    """Each weight's cost [outputs, features], the share of the layer it removes: with H, the OBS saliency
    relative to the layer's output energy tr(W H W^T); without, w^2 relative to the layer's squared norm.
    (Relative to the mean w^2 instead, a uniform threshold on |w| / rms(w) as Han et al. set theirs, the
    MNIST model at 50% kept 44.5% accuracy, not 96.1%: it cut the 144-weight first conv as much as the rest.)"""
    if gram is None:
        return weight ** 2 / max(float(np.sum(weight ** 2)), 1e-30)
    costs = weight ** 2 / np.diag(damped_inverse(gram))[None, :]
    return costs / max(quadratic(weight, gram), 1e-30)


def optimal_update(weight: np.ndarray, keep: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """The weights with the dropped ones (keep False) zeroed and each row's kept ones re-fitted to the row's
    output under H = `gram` (damped): exactly up to EXACT_FEATURES features, beyond by `sequential_update`."""
    if gram.shape[0] > EXACT_FEATURES:
        return sequential_update(weight, keep, gram)
    h = damped(gram)
    features = h.shape[0]
    out = np.where(keep, weight, 0.0)
    chunk = max(1, SOLVE_BYTES // (8 * features * features))
    for start in range(0, len(weight), chunk):  # chunks of rows, each one batched solve
        k = keep[start:start + chunk].astype(np.float64)
        dropped = weight[start:start + chunk] * (1.0 - k)
        system = k[:, :, None] * h[None] * k[:, None, :] + np.eye(features)[None] * (1.0 - k)[:, None, :]
        rhs = k * (dropped @ h)
        out[start:start + chunk] += k * np.linalg.solve(system, rhs[:, :, None])[:, :, 0]
    return out


def sequential_update(weight: np.ndarray, keep: np.ndarray, gram: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """SparseGPT's update (Frantar & Alistarh 2023, Algorithm 1, with the mask given): the features are
    visited in order; each column's dropped weights are zeroed and their error spread over the columns not
    yet visited through the upper Cholesky factor U of H^-1 (U^T U = H^-1, whose row j is the OBS update
    for column j once the earlier columns are fixed). Within a block of `block` columns the update is
    applied column by column, to the later blocks once per block (the lazy batch update). O(f^3 + rows f^2)
    instead of the exact solve's rows f^3; the earlier columns are not re-fitted, so the error is somewhat
    above the exact one's (tests/test_sparsity.py measures it)."""
    upper = np.linalg.cholesky(damped_inverse(gram)).T
    out = weight.astype(np.float64)  # a copy
    features = out.shape[1]
    for start in range(0, features, block):
        end = min(start + block, features)
        errors = np.zeros((out.shape[0], end - start))
        for j in range(start, end):
            dropped = ~keep[:, j]
            error = np.where(dropped, out[:, j], 0.0) / upper[j, j]
            out[:, j:end] -= error[:, None] * upper[j, j:end][None, :]
            out[dropped, j] = 0.0  # exactly zero
            errors[:, j - start] = error
        out[:, end:] -= errors @ upper[start:end, end:]
    return out


def allocate(unit_costs: list[np.ndarray], unit_sizes: list[int], sparsity: float, ceiling: float) -> list[float]:
    """Per layer, the fraction of its units to remove so that `sparsity` of all their weights go: one cost
    threshold for every layer (costs are relative to each layer's output, so comparable), no layer above
    `ceiling`. Bisected on the threshold; the fractions are those of the smallest threshold that reaches
    the target."""
    sorted_costs = [np.sort(c, axis=None) for c in unit_costs]
    weights = np.array([c.size * s for c, s in zip(unit_costs, unit_sizes)], dtype=np.float64)
    goal = sparsity * weights.sum()

    def fractions(threshold: float) -> np.ndarray:
        counts = np.array([np.searchsorted(c, threshold, side="right") for c in sorted_costs], dtype=np.float64)
        return np.minimum(counts / np.maximum([c.size for c in sorted_costs], 1), ceiling)

    lo, hi = 0.0, max(float(c[-1]) for c in sorted_costs) * 2 + 1e-30
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.sum(fractions(mid) * weights) >= goal:
            hi = mid
        else:
            lo = mid
    return fractions(hi).tolist()
