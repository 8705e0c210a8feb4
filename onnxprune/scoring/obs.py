"""Reconstruction-aware channel selection: structured Optimal Brain Surgeon over the consumer layers.

What least squares can re-predict from the kept channels decides which channels go. Every consumer layer
(a Conv, ConvTranspose, Gemm or MatMul reading a group's channels as input features) is a linear map
`y = W x` over its input features `x` (im2col patches for convolutions, C-major, plus a constant 1 for the
bias, which is never removed). From the calibration data:

    H = X^T X / N + lambda I                                     (damped Gram matrix of the features)

Removing the feature set S of a unit (all kernel taps of its channels) and re-fitting the remaining
weights optimally raises the layer's squared output error (per row) by (Optimal Brain Compression,
Frantar & Alistarh 2022, eq. 4, in its structured form as in ZipLM, Kurtic et al. 2023, eq. 5):

    eps_S = tr( W_S [(H^-1)_SS]^-1 W_S^T )

and the optimal update of the rest, with the matching update of the inverse Gram matrix (OBC eq. 5-6):

    W     <- W - W_S [(H^-1)_SS]^-1 (H^-1)_{S,:}
    H^-1  <- H^-1 - (H^-1)_{:,S} [(H^-1)_SS]^-1 (H^-1)_{S,:}

Units are removed greedily in batches (the cheapest first; OSSCAR, Meng et al. 2024, does the same local
search with exact swaps); after every batch the joint cost of the batch is exact, so each group gets an
error curve: its consumers' relative output error after removing 1, 2, ... units, summed over its
consumers (a residual stream or a Concat feeds several). The ranking is the removal order; the curve
drives the allocation (`allocate`): the global budget is spent where error per MAC saved is lowest.

The statistics come from the original model's inputs (one capture pass); the kept channels are then
re-fitted by the sequential least-squares recovery on the pruned model's own inputs (recover/), which is
the same ridge solution on the kept columns, against the original's outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..allocate import group_round_to, round_keep
from ..calib.capture import stream_activations
from ..calib.data import held_out
from ..calib.stats import capture_batch_size
from ..errors import UsageError
from ..workers import numeric_pool, ordered
from .base import Allocation, register_scorer
from .consumers import Consumer, choose_points, find_consumers
from .refine import Refinement
from .sensitivity import SHARES, OutputProbe, measured_points, rescaled

log = logging.getLogger(__name__)

DAMP = 0.01  # lambda, relative to the mean diagonal of X^T X / N (OBC's dampening)
ROWS_PER_FEATURE = 32  # sampled rows (output positions) per input feature, over the calibration set
MIN_ROWS = 2048
MAX_BATCH_ELEMENTS = 8_000_000  # rows x features gathered at once (bounds the im2col buffer)
FOLD_ELEMENTS = 2_000_000  # rows x features a Gram matrix waits for, at least: one product per that many rows,
# not one per capture batch, whose F^2 pass dominated. A wide layer waits for F / 2 rows (a quarter of its float64
# Gram matrix's memory): each fold adds an F x F product into it, and ResNet-50's 4609-feature folds of 434 rows
# ran at 33 GF/s, a third of what BLAS gives a product of 2304 rows
WORK_DTYPE = np.float32  # of H^-1 and the weights in the greedy removal (twice as fast as float64)
MAX_FEATURES = 12_288  # per layer: H^-1 must fit in memory and update in seconds
REMOVAL_STEPS = 32  # units are removed in about this many batches per group
MIN_KEEP_FRACTION = 0.1  # the allocation cuts no group below this share of its channels ...
SOFT_KEEP_FRACTION = 0.25  # ... nor below this one where the target allows: the output probe measures a group
# at most half cut, and deeper cuts rest on its gain extrapolated (on 1024 renders, five seeds: the rotation
# classifier at 50% of MACs 0.944 -> 0.950, the direction classifier 0.900 -> 0.904 at 70%; MNIST, the detector
# and the recognizer alike)
LOG_PRICE_RANGE = (-60.0, 60.0)
BISECTION_STEPS = 200
REFINE_MEASUREMENTS = 0  # > 0: the allocation refined by measuring the whole cut, this many runs at most
# (scoring/refine.py; an experiment, off: bench/eval_scoring.py's obs[refine] column)


# ---------------------------------------------------------------- one layer as a reconstruction problem


@dataclass
class Problem:
    """One consumer (one block of a grouped conv) as `y = W x`: W [outputs, features + 1], the last
    column the bias; `hinv` the inverse damped Gram matrix; `columns[u]` the features of unit position u
    (an index into the group; absent when the layer does not read that unit)."""

    weight: np.ndarray
    hinv: np.ndarray
    columns: dict[int, np.ndarray]
    energy: float  # mean squared output per row, tr(W H W^T): errors are relative to it
    # the held-out rows, where the curve is measured: Z [features, m] with Z Z^T their Gram matrix (the
    # rows / sqrt(rows) while at most twice the features, else a Cholesky factor: `GramFold._held_factor`)
    held: np.ndarray | None = None
    residual: np.ndarray | None = None  # (W0 - W) Z: the change of the weights since `copy`, on those rows
    held_energy: float = 0.0  # |W0 Z|^2 of the weights W0 at `copy`
    consumer: Consumer | None = None  # the layer, and which of its conv blocks this is
    block: int = 0
    # set by `drop` (a problem shrunk to its live features): the layer's feature of each column
    index: np.ndarray | None = None
    width: int = 0  # with `index`: the layer's feature count (the bias column included)
    pending: list = field(default_factory=list)  # columns removed by `drop`, still in the arrays
    # H^-1 is `hinv - lowrank lowrank^T`: `remove`'s updates since the last compaction (about a quarter of the
    # features plus one batch's wide), applied to what is left of H^-1 when it is compacted (`_compact`) instead
    # of to all of it at every removal. `hinv` alone is stale while this is set; it is None on the problems
    # `GramFold.problems` gives (which refine.py and reselect.py read), only their work copies have it.
    # Never changed in place (replaced), so copies share it
    lowrank: np.ndarray | None = None

    def copy(self) -> "Problem":
        """A copy to remove units from, its arrays in H^-1's dtype (WORK_DTYPE from `GramFold.problems`), with
        the updates still pending (`lowrank`); columns removed and not yet dropped stay in its arrays."""
        weight = self.weight.astype(self.hinv.dtype)
        held = residual = None
        held_energy = 0.0
        if self.held is not None:
            held = self.held.astype(self.hinv.dtype, copy=False)
            held_energy = float(np.sum(np.square(weight @ held)))
            residual = np.zeros((len(weight), held.shape[1]), held.dtype)
        return Problem(weight, self.hinv.copy(), self.columns, self.energy, held, residual, held_energy,
                       self.consumer, self.block, self.index, self.width, lowrank=self.lowrank)

    def held_error(self) -> float:
        """The relative output error of the current (updated) weights on the held-out rows."""
        if self.residual is None or not self.held_energy > 0:
            return 0.0
        return float(np.sum(np.square(self.residual))) / self.held_energy

    def full_weight(self) -> np.ndarray:
        """The weights over all the layer's features (dropped ones zero)."""
        if self.index is None:
            return self.weight
        full = np.zeros((len(self.weight), self.width), self.weight.dtype)
        full[:, self.index] = self.weight
        return full

    def drop(self, units: np.ndarray) -> float:
        """`remove`, and the removed features are dropped from the arrays once they are a quarter of them:
        their rows and columns of H^-1 and their weights are zero after the update, so the pending updates are
        applied to the live features only and later removals read rows of live features (a greedy pass to one
        unit: about a third of the work). `full_weight` gives the weights in the layer's layout."""
        cost = self.remove(units)
        removed = set(units.tolist())
        self.pending = [*self.pending, *(self.columns[u] for u in removed if u in self.columns)]
        self.columns = {u: c for u, c in self.columns.items() if u not in removed}
        if sum(map(len, self.pending)) * 4 >= self.weight.shape[1]:
            self._compact()
        return cost

    def _compact(self) -> None:
        gone = np.concatenate(self.pending)
        self.pending = []
        if self.index is None:
            self.index, self.width = np.arange(self.weight.shape[1]), self.weight.shape[1]
        live = np.ones(self.weight.shape[1], dtype=bool)
        live[gone] = False
        kept = np.flatnonzero(live)
        if self.held is not None:  # the residual keeps what the dropped features changed
            self.held = self.held[kept]
        self.weight = self.weight[:, kept]
        self.hinv = self.hinv[np.ix_(kept, kept)]
        if self.lowrank is not None:
            kept_lowrank = self.lowrank[kept]
            self.hinv -= kept_lowrank @ kept_lowrank.T  # one symmetric product (BLAS syrk)
            self.lowrank = None
        self.index = self.index[kept]
        position = np.cumsum(live) - 1
        self.columns = {u: position[c] for u, c in self.columns.items()}

    def unit_costs(self, units: np.ndarray) -> np.ndarray:
        """eps of removing each of `units` alone (relative to the output energy); units the layer does
        not read cost 0."""
        costs = np.zeros(len(units))
        by_size: dict[int, list[int]] = {}
        for i, u in enumerate(units.tolist()):
            cols = self.columns.get(u)
            if cols is not None:
                by_size.setdefault(len(cols), []).append(i)
        for size, rows in by_size.items():
            cols = np.stack([self.columns[int(units[i])] for i in rows])  # [m, k]
            blocks = self.hinv[cols[:, :, None], cols[:, None, :]]  # [m, k, k]
            if self.lowrank is not None:
                lowrank = self.lowrank[cols]  # [m, k, rank]
                blocks -= lowrank @ lowrank.transpose(0, 2, 1)
            inverse = np.linalg.inv(blocks)
            w = self.weight[:, cols]  # [outputs, m, k]
            costs[rows] = np.einsum("omk,mkl,oml->m", w, inverse, w, optimize=True)
        return np.maximum(costs, 0.0) / self.energy

    def remove(self, units: np.ndarray) -> float:
        """Remove `units` together with the optimal update; returns their joint relative cost."""
        cols = [self.columns[u] for u in units.tolist() if u in self.columns]
        if not cols:
            return 0.0
        s = np.concatenate(cols)
        rows = self.hinv[s, :]  # (H^-1)_{S,:}
        if self.lowrank is not None:
            rows -= self.lowrank[s] @ self.lowrank.T
        block = rows[:, s]
        inverse = np.linalg.inv(block)
        w_s = self.weight[:, s]
        cost = float(np.einsum("os,st,ot->", w_s, inverse, w_s, optimize=True))
        step = w_s @ inverse  # the weights change by -step @ rows
        if self.residual is not None:
            self.residual += step @ (rows @ self.held)
        self.weight -= step @ rows
        # (H^-1)_{:,S} [(H^-1)_SS]^-1 (H^-1)_{S,:} = B B^T, B^T = C^-1 (H^-1)_{S,:} with C C^T = (H^-1)_SS. B joins
        # `lowrank`: the next removals read only their own rows of H^-1, and the F x F update waits for the
        # compaction, on the features left (ResNet-50's greedy removals 25-30% faster on its wide layers)
        factor = np.linalg.solve(np.linalg.cholesky(block), rows).T
        self.lowrank = factor if self.lowrank is None else np.concatenate([self.lowrank, factor], axis=1)
        self.weight[:, s] = 0.0
        return max(cost, 0.0) / self.energy


def quadratic(weight: np.ndarray, gram: np.ndarray) -> float:
    """tr(W G W^T): the mean squared output of `x W^T` over rows whose Gram matrix is G (one BLAS product)."""
    return float(np.sum((weight @ gram) * weight))


def damped(gram: np.ndarray) -> np.ndarray:
    """G + lambda I with lambda = DAMP x the mean diagonal (OBC's dampening)."""
    out = gram.copy()
    out[np.diag_indices_from(out)] += damping(float(np.trace(gram)) / len(gram))
    return out


def damping(mean_diagonal: float) -> float:
    """lambda, for a Gram matrix of that mean diagonal (1 for an all-zero one)."""
    return DAMP * (mean_diagonal if mean_diagonal > 0 else 1.0)


def damped_inverse(gram: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(G + lambda I)^-1 (the bias column is damped too, slightly), as L^-T L^-1 from the Cholesky factor
    L L^T = G + lambda I (which reads G's lower triangle only): the factor in float64, the rest (matrix
    products) in `dtype`. In float32, twice as fast as np.linalg.inv (whose LU solves are no faster in
    float32 than in float64); the factor in float64 keeps the error near eps x cond(L) = eps x sqrt(cond(H))."""
    lower = np.linalg.cholesky(damped(gram)).astype(dtype)
    inverse = triangular_inverse(lower)
    return inverse.T @ inverse


def damped_inverse_of_rows(rows: np.ndarray, dtype=np.float64) -> np.ndarray:
    """`damped_inverse` of the Gram matrix X^T X / n of rows X [n, F] fewer than their features, by Woodbury's
    identity: (X^T X / n + lambda I)^-1 = (I - X^T (n lambda I + X X^T)^-1 X) / lambda = (I - B^T B) / lambda,
    B = L^-1 X with L L^T = n lambda I + X X^T. An n x n factorisation instead of an F x F one, and no Gram
    matrix (ResNet-50's widest layers, 4609 features and 2350 fit rows: 4.1 -> 1.6 s with the Gram fold). In float32
    the subtraction leaves H H^-1 further from I (4e-2 against 2e-4) but the greedy removal's order and curve
    the same as from the exact inverse (to 1e-4)."""
    n, features = rows.shape
    lam = damping(float(np.einsum("ij,ij->", rows, rows, dtype=np.float64)) / n / features)
    outer = (rows @ rows.T).astype(np.float64)
    outer[np.diag_indices_from(outer)] += n * lam
    factor = triangular_inverse(np.linalg.cholesky(outer).astype(dtype)) @ rows.astype(dtype, copy=False)
    inverse = factor.T @ factor
    inverse *= -1 / lam
    inverse[np.diag_indices_from(inverse)] += 1 / lam
    return inverse


def triangular_inverse(lower: np.ndarray, leaf: int = 128) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0],
    [-C^-1 B A^-1, C^-1]] (numpy has no triangular solver; the products are BLAS's)."""
    n = len(lower)
    if n <= leaf:
        return np.linalg.inv(lower)
    half = n // 2
    top, bottom = triangular_inverse(lower[:half, :half], leaf), triangular_inverse(lower[half:, half:], leaf)
    inverse = np.zeros_like(lower)
    inverse[:half, :half] = top
    inverse[half:, half:] = bottom
    inverse[half:, :half] = -(bottom @ (lower[half:, :half] @ top))
    return inverse


def removal_batch(channels: int, steps: int = REMOVAL_STEPS) -> int:
    """Units `greedy_removal` removes at once from a group of `channels`."""
    return max(1, -(-(channels - 1) // steps))


def greedy_removal(problems: list[Problem], channels: int, steps: int = REMOVAL_STEPS,
                   snapshots: dict[int, list] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove all but one of `channels` units from the problems (copies are changed, not these), the
    cheapest summed cost first, in batches of `removal_batch`. Returns (removal order [channels - 1], error
    curve [channels]: curve[r] is the summed relative error after removing the first r units). The curve is
    measured on the held-out rows of problems that have them (the removal cost on the rows it was chosen
    on flatters a layer whose inputs are nearly collinear on the calibration data), else it is the exact
    joint cost; it never decreases. `snapshots`: for each of its keys r that ends a batch, filled with the
    problems' updated weights after removing r units."""
    work = [p.copy() for p in problems]
    alive = np.ones(channels, dtype=bool)
    order, curve = [], [0.0]
    spent = np.zeros(len(work))  # each problem's exact cost of its removals so far
    batch = removal_batch(channels, steps)
    while alive.sum() > 1:
        units = np.flatnonzero(alive)
        costs = sum((p.unit_costs(units) for p in work), np.zeros(len(units)))
        take = min(batch, len(units) - 1)
        chosen = units[np.argsort(costs, kind="stable")[:take]]
        spent += [p.drop(chosen) for p in work]
        reached = max(curve[-1], sum(p.held_error() if p.held is not None else cost for p, cost in zip(work, spent)))
        alone = np.sort(costs)[:take]
        # within a batch the curve follows the units' own costs, scaled to the error at the batch's end
        share = np.cumsum(alone) / alone.sum() if alone.sum() > 0 else np.arange(1, take + 1) / take
        curve.extend(curve[-1] + (reached - curve[-1]) * share)
        order.extend(chosen.tolist())
        alive[chosen] = False
        if snapshots is not None and len(order) in snapshots:
            snapshots[len(order)] = [p.full_weight().copy() for p in work]
    return np.array(order, dtype=np.int64), np.array(curve)


# ---------------------------------------------------------------- statistics from the calibration data


class GramFold:
    """One consumer's Gram matrix of sampled input features (with a constant 1), folded batch by batch, and
    the held-out rows (calib.data.held_out) that measure the curve: kept as they are while they are at most
    twice the features (in float32 no larger than their Gram matrix in float64; ResNet-50's widest layers
    have 627 held-out rows of 4608 features), a Gram matrix of their own beyond. Rows fewer than the features
    are a thin factor of that Gram matrix, which makes the greedy removal's held-out error cheaper to keep
    (`Problem.remove`), and the Gram matrix and its factorisation are never computed. So are the fit rows,
    when all the rows chosen (fit and held-out: ResNet-50's widest layers 2940 at 64 samples, 2350 fit) are fewer
    than a conv block's features: no Gram matrix, H^-1 from the rows themselves."""

    def __init__(self, consumer: Consumer, samples: int, batches: int, rng, may_keep_rows: bool = True):
        self.consumer = consumer
        self.features = features = consumer.fan_in * consumer.groups + 1
        wanted = max(MIN_ROWS, ROWS_PER_FEATURE * consumer.fan_in)
        per_batch = max(64, min(-(-wanted // max(batches, 1)), MAX_BATCH_ELEMENTS // features))
        self.chosen = choose_points(consumer, samples, per_batch * batches, rng)
        # fewer rows than a conv block's features (a deep layer of few positions, few samples): they are kept,
        # not folded, and H^-1 comes from them (`damped_inverse_of_rows`); a block with more rows than features
        # (a grouped conv's) would factorise a larger matrix that way
        self.keep_rows = may_keep_rows and len(self.chosen) < consumer.fan_in + 1
        self.gram = None if self.keep_rows else np.zeros((features, features))  # rows of the fit samples
        self.held: np.ndarray | None = None  # rows of the held-out samples, beyond twice the features
        self.count = self.held_count = 0
        self.waiting: tuple[list, list] = ([], [])  # fit and held-out rows not yet in the Gram matrices

    def add(self, activation: np.ndarray, start: int, size: int) -> None:
        flat = self.consumer.batch_points(self.chosen, start, size)
        if not len(flat):
            return
        x = self.consumer.points(activation, flat)
        x = np.concatenate([x.astype(np.float32, copy=False), np.ones((len(x), 1), np.float32)], axis=1)
        held = held_out(start + flat // self.consumer.positions)
        self.waiting[0].append(x[~held])
        self.waiting[1].append(x[held])
        self.count += int((~held).sum())
        self.held_count += int(held.sum())
        folding = self.waiting[0] + (self.waiting[1] if self._held_gram() else [])
        if not self.keep_rows and sum(map(len, folding)) * x.shape[1] >= max(FOLD_ELEMENTS, x.shape[1] ** 2 // 2):
            self.fold()

    def _held_gram(self) -> bool:
        return self.held_count > 2 * self.features

    def fold(self) -> None:
        """Add the waiting rows into the Gram matrices (the held-out ones beyond twice the features):
        float32 products (twice as fast as float64 in BLAS), summed into float64."""
        if self._held_gram() and self.held is None:
            self.held = np.zeros_like(self.gram)
        for gram, rows in zip((self.gram, self.held), self.waiting):
            if rows and gram is not None:
                x = np.concatenate(rows)
                gram += x.T @ x
                rows.clear()

    def _held_factor(self, take: np.ndarray, rows: np.ndarray | None) -> np.ndarray | None:
        """Z [len(take), m] with Z Z^T the held-out rows' Gram matrix over the features `take` (/ rows): the
        `rows` (scaled by 1 / sqrt(rows)) themselves, or else the Cholesky factor of their Gram matrix (with a
        jitter of 1e-6 of its mean diagonal for dead or repeated features; from its eigenvectors when rounding
        left it indefinite even so)."""
        if not self.held_count:
            return None
        if rows is not None:
            return np.ascontiguousarray(columns_of(rows, take).T)
        gram = square_block(self.held, take) / self.held_count
        gram[np.diag_indices_from(gram)] += 1e-6 * max(float(np.trace(gram)) / len(gram), 1e-30)
        try:
            return np.linalg.cholesky(gram).astype(WORK_DTYPE)
        except np.linalg.LinAlgError:
            values, vectors = np.linalg.eigh(gram)
            return (vectors * np.sqrt(np.maximum(values, 0.0))).astype(WORK_DTYPE)

    def _block_statistics(self, take: np.ndarray, w: np.ndarray, fit_rows: np.ndarray | None):
        """(energy, H^-1) of a conv block's features `take` and weights `w`, from the Gram matrix or, where the
        fit rows were kept, from them; H^-1 None when the block's outputs are all zero (nothing to score)."""
        if fit_rows is None:
            gram = square_block(self.gram, take)
            energy = quadratic(w.astype(WORK_DTYPE), gram.astype(WORK_DTYPE))  # a scale: float32 will do
            return energy, damped_inverse(gram, WORK_DTYPE) if energy > 0 else None
        x = columns_of(fit_rows, take)
        energy = float(np.sum(np.square(x @ w.T.astype(np.float32)))) / max(self.count, 1)
        return energy, damped_inverse_of_rows(x, WORK_DTYPE) if energy > 0 else None

    def problems(self, analysis) -> list[tuple[int, Problem]]:
        """(group index, Problem) for every prunable group this layer reads, one per conv block. Once: the
        fold's matrices are scaled in place and its held-out rows handed over."""
        consumer = self.consumer
        fit_rows = None
        if self.keep_rows:
            fit_rows = np.concatenate(self.waiting[0]) if self.waiting[0] else np.zeros((0, self.features), np.float32)
            self.waiting[0].clear()
        else:
            self.fold()
            self.gram /= max(self.count, 1)  # in place, no second F x F copy: a fold gives its problems once
        held_rows = None  # (folded into a Gram matrix, or none held out: none waiting)
        if self.waiting[1] and self.held_count:
            held_rows = np.concatenate(self.waiting[1])
            held_rows *= np.float32(1 / np.sqrt(self.held_count))
        self.waiting[1].clear()
        weight, bias = _layer_matrix(consumer)
        groups = consumer.groups
        per_block_in = consumer.channels // groups
        per_block_out = weight.shape[0] // groups
        kernel = consumer.kernel
        owners = analysis.group_of[consumer.units]
        positions = analysis.position[consumer.units]
        found = []
        for block in range(groups):
            in_channels = block_channels(consumer, block)
            take = block_features(consumer, block)
            rows = slice(block * per_block_out, (block + 1) * per_block_out)
            w = np.concatenate([weight[rows], bias[rows, None]], axis=1)  # a block reads its own channels
            energy, hinv = self._block_statistics(take, w, fit_rows)
            if hinv is None:
                continue
            held = self._held_factor(take, held_rows)
            local = np.arange(per_block_in * kernel).reshape(per_block_in, kernel)
            for g in np.unique(owners[in_channels][owners[in_channels] >= 0]).tolist():
                columns: dict[int, list] = {}
                for c in np.flatnonzero(owners[in_channels] == g).tolist():
                    columns.setdefault(int(positions[in_channels[c]]), []).append(local[c])
                found.append((g, Problem(w, hinv, {u: np.concatenate(v) for u, v in columns.items()}, energy,
                                         held, consumer=consumer, block=block)))
        return found


def block_channels(consumer: Consumer, block: int) -> np.ndarray:
    """The input channels a consumer's conv block reads."""
    per_block_in = consumer.channels // consumer.groups
    return np.arange(block * per_block_in, (block + 1) * per_block_in)


def block_features(consumer: Consumer, block: int) -> np.ndarray:
    """The features of a consumer's conv block (C-major, as `Consumer.points` lays them out) and its bias
    column, the last."""
    in_channels = block_channels(consumer, block)
    features = (in_channels[:, None] * consumer.kernel + np.arange(consumer.kernel)[None, :]).ravel()
    return np.append(features, consumer.fan_in * consumer.groups)


def columns_of(rows: np.ndarray, take: np.ndarray) -> np.ndarray:
    """The columns `take` (sorted) of rows: the rows themselves when they are all of them."""
    return rows if len(take) == rows.shape[1] else rows[:, take]


def square_block(matrix: np.ndarray, take: np.ndarray) -> np.ndarray:
    """The rows and columns `take` (sorted) of a square matrix: itself when they are all of them."""
    return matrix if len(take) == len(matrix) else matrix[np.ix_(take, take)]


def _layer_matrix(consumer: Consumer) -> tuple[np.ndarray, np.ndarray]:
    """The consumer's weight as [outputs, features] (features as `Consumer.points` lays them out), with
    the factor the op applies to it (Gemm's alpha), and its per-output bias (zeros without one)."""
    layout = consumer.layout
    weight = consumer.weight.reshape(consumer.weight.shape[0], -1).astype(np.float64) * layout.scale
    bias = np.zeros(weight.shape[0])
    index = layout.bias_input
    if index is not None and index < len(consumer.node.inputs) and hasattr(consumer.node.inputs[index], "values"):
        values = np.asarray(consumer.node.inputs[index].values, dtype=np.float64)
        packed = consumer.handler.bias_offset(layout, values)  # a recurrent layer's B: W's and R's biases
        if packed is not None:
            values = packed
        if values.size == weight.shape[0]:
            bias = values.reshape(-1) * layout.bias_scale
    return weight, bias


# ---------------------------------------------------------------- the scorer


@dataclass
class ObsStats(Allocation):
    """The obs scorer's allocation: each group's removal order and error curve, spent by error per MAC."""

    curves: dict[int, np.ndarray] = field(default_factory=dict)
    unread: list[int] = field(default_factory=list)  # groups no consumer reads: left whole
    layers: int = 0
    rows: int = 0  # fit rows of the widest layer (held-out rows come on top)
    sensitivity_samples: int = 0  # held-out samples each output-error measurement ran (sensitivity.py)
    refinement: Refinement | None = None  # with REFINE_MEASUREMENTS: what refines the allocation

    global_note = "obs: --global changes nothing (its budget spans all groups already)"

    def keep_counts(self, analysis, scores, target, round_to) -> tuple[dict[int, int], dict]:
        """The price lambda of a unit of `target` (a MAC, or a channel) is bisected until the target is met;
        at a price, each group keeps the count minimising its error curve - lambda x what it saves, so the
        budget goes where error per MAC is lowest. Groups keep at least SOFT_KEEP_FRACTION where every group
        there meets the target, else MIN_KEEP_FRACTION, and round_to."""
        channels = {g.index: g.channels for g in analysis.prunable_groups()}
        widths = {g.index: g.width for g in analysis.prunable_groups()}
        curved = [g for g in channels if g in self.curves]
        full = target.measure(channels)
        smooth = target.smooth or target.measure  # a stepped measure (ms) may save nothing for one channel
        saving = {g: max(smooth(channels) - smooth({**channels, g: channels[g] - 1}), 1e-12) for g in curved}

        def counts_at(log_price: float) -> dict[int, int]:
            counts = dict(channels)
            for g in curved:
                removed = channels[g] - choices[g]
                objective = self.curves[g][removed] - np.exp(log_price) * removed * saving[g]
                counts[g] = int(choices[g][np.argmin(objective)])
            return counts

        if full <= target.limit:
            return dict(channels), {"price": 0.0, "target": float(target.limit), "achieved": float(full),
                                    "unit": target.unit}
        lo, hi = LOG_PRICE_RANGE
        for floor in (max(SOFT_KEEP_FRACTION, MIN_KEEP_FRACTION), MIN_KEEP_FRACTION):
            choices = {g: keep_choices(channels[g], group_round_to(round_to, g), widths[g], floor) for g in curved}
            if target.measure(counts_at(hi)) <= target.limit:
                break
        else:
            lo = hi  # every group at its floor: as close as it gets
        for _ in range(BISECTION_STEPS):
            if hi - lo < 1e-6:
                break
            mid = (lo + hi) / 2
            if target.measure(counts_at(mid)) <= target.limit:
                hi = mid
            else:
                lo = mid
        counts = fill_slack(counts_at(hi), curved, choices, self.curves, channels, target)
        achieved = target.measure(counts)
        refined = None
        if achieved <= target.limit and self.refinement is not None:  # (a budget not reached: noted by stages)
            counts, refined = self.refinement.refine(counts, curved, choices, channels, scores, target)
            achieved = target.measure(counts)
        summary = {"price": float(np.exp(hi)), "target": float(target.limit), "achieved": float(achieved),
                   "unit": target.unit}
        return counts, summary if refined is None else {**summary, "refinement": refined}

    def summary(self, mode: str) -> dict:
        return {"layers": self.layers, "rows_per_layer": self.rows, "sensitivity_samples": self.sensitivity_samples}


def fill_slack(counts: dict[int, int], curved: list[int], choices: dict[int, np.ndarray], curves, channels,
               target) -> dict[int, int]:
    """Give back what the price's jumps left unspent: a group's best count can jump by many channels as the
    price rises past a flat stretch of its curve, so the bisection may undershoot the target. One count at
    a time, the group whose next larger count buys the most error per unit of target still within it."""
    counts = dict(counts)
    while True:
        used = target.measure(counts)
        spare = target.limit - used
        best, best_gain = None, 0.0
        for g in curved:
            larger = choices[g][choices[g] > counts[g]]
            if not len(larger):
                continue
            trial = {**counts, g: int(larger[0])}
            cost = target.measure(trial) - used
            if cost > spare:
                continue
            gain = (curves[g][channels[g] - counts[g]] - curves[g][channels[g] - larger[0]]) / max(cost, 1e-12)
            if best is None or gain > best_gain:
                best, best_gain = trial, gain
        if best is None:
            return counts
        counts = best


def keep_choices(channels: int, round_to, width: int = 1, floor: float | None = None) -> np.ndarray:
    """Keep counts a group of units `width` channels wide may take: rounded as round_to says, at least
    `floor` of it (MIN_KEEP_FRACTION by default; a count rounded to below it is not one: a quarter of 40
    channels rounded to eights would be 8)."""
    floor = max(int(np.ceil((MIN_KEEP_FRACTION if floor is None else floor) * channels)), 1)
    counts = {round_keep(k, channels, round_to, width) for k in range(floor, channels + 1)}
    return np.array(sorted(k for k in counts if k >= floor))


def gram_folds(analysis, context, consumers: list[Consumer]) -> list[GramFold]:
    calibration = context.calibration
    names = sorted({c.tensor for c in consumers})
    batch = capture_batch_size(analysis.shapes, names, context.batch_size, context.fixed_batch)
    batches = -(-calibration.count // batch)
    folds = [GramFold(c, calibration.count, batches, np.random.default_rng([context.seed, i]))
             for i, c in enumerate(consumers)]
    start = 0
    with numeric_pool() as pool:
        for acts in stream_activations(context.model, names, calibration, batch, progress="OBS statistics"):
            size = min(batch, calibration.count - start)  # not an activation's first axis: a recurrent
            # layer's input is [steps, batch, features]
            list(pool.map(lambda fold: fold.add(acts[fold.consumer.tensor], start, size), folds))  # noqa: B023
            start += size
    return folds


def _group_removal(problems: list[Problem], channels: int) -> tuple[np.ndarray, np.ndarray, list[int], dict]:
    """A group's greedy removal, with its updated weights at the removal counts the probe measures."""
    points = measured_points(channels, removal_batch(channels), channels - keep_choices(channels, 1)[0])
    snapshots = dict.fromkeys(points)
    order, curve = greedy_removal(problems, channels, snapshots=snapshots)
    return order, curve, points, snapshots


def _group_curve(problems: list[Problem], channels: int, removal, probe: OutputProbe) -> tuple[np.ndarray, np.ndarray]:
    """A group's unit scores (its removal order: the last removed scores highest) and its error curve,
    rescaled to the model's outputs by the probe's measurements."""
    order, curve, points, snapshots = removal
    errors = probe.errors(problems, [snapshots[r] for r in points])
    return _rank(order, channels), rescaled(curve, points, errors)


def greedy_order_scores(problems: list[Problem], channels: int) -> np.ndarray:
    """A group's unit scores alone (no curve, no measurement)."""
    return _rank(greedy_removal(problems, channels)[0], channels)


def _rank(order: np.ndarray, channels: int) -> np.ndarray:
    """Scores from a removal order: the last removed scores highest, the survivor above all."""
    rank = np.full(channels, float(channels))
    rank[order] = np.arange(len(order))
    return rank


@register_scorer("obs", allocates=True)
def obs(analysis, context):
    """Units ranked by their greedy structured-OBS removal order (the last removed scores highest)."""
    if context.model is None or context.calibration is None:
        raise UsageError("the obs scorer needs the model and calibration data (use onnxprune.prune)")
    consumers = [c for c in find_consumers(analysis) if c.fan_in * c.groups < MAX_FEATURES]
    folds = gram_folds(analysis, context, consumers) if consumers else []
    by_group: dict[int, list[Problem]] = {}
    with numeric_pool() as pool:  # layers, then groups, side by side; each result as alone
        # the costliest inverses first (seconds each on the widest layers: last, one worker was left alone
        # with them); a group's problems come in that order
        costliest_first = sorted(folds, key=lambda f: -f.consumer.groups * (f.consumer.fan_in + 1) ** 3)
        for found in pool.map(lambda fold: fold.problems(analysis), costliest_first):
            for g, problem in found:
                by_group.setdefault(g, []).append(problem)
        stats = ObsStats(layers=len(folds), rows=max((f.count for f in folds), default=0))
        groups = [g for g in analysis.prunable_groups() if by_group.get(g.index) and g.channels > 1]
        scores = {}
        if groups and not context.allocating:  # the counts are given: the ranking alone is used
            ranked = pool.map(lambda g: greedy_order_scores(by_group[g.index], g.channels), groups)
            scores = {g.index: ranking for g, ranking in zip(groups, ranked)}
        elif groups:
            with OutputProbe(context.model, context.calibration, context.fixed_batch,
                             [f.consumer.node.outputs[0].name for f in folds], len(groups) * len(SHARES)) as probe:
                groups = sorted(groups, key=lambda g: probe.first_node(by_group[g.index]))  # the probe's order
                # the removals run in the pool while the probe measures the groups done before
                removals = ordered(pool, lambda g: _group_removal(by_group[g.index], g.channels), groups)
                for group, removal in zip(groups, removals):
                    scores[group.index], stats.curves[group.index] = _group_curve(by_group[group.index],
                                                                                  group.channels, removal, probe)
                stats.sensitivity_samples = probe.samples.count
            if REFINE_MEASUREMENTS > 0 and hasattr(context.model, "graph"):  # not a model read from a file (big)
                stats.refinement = Refinement({g.index: by_group[g.index] for g in groups}, context.model,
                                              context.calibration, context.fixed_batch, REFINE_MEASUREMENTS)
    stats.unread = [g.index for g in analysis.prunable_groups() if g.index not in scores]
    scores = {g.index: scores.get(g.index, np.ones(g.channels)) for g in analysis.prunable_groups()}
    context.allocation = stats
    unread = [g for g in stats.unread if analysis.groups[g].channels > 1]
    if unread:
        context.notes.append(f"obs: {len(unread)} group(s) feed no Conv/Gemm/MatMul it can score "
                             "(or too wide a layer): left whole")
    return scores
