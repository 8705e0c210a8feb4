"""Re-choosing which channels each group keeps, on the pruned model's own inputs (two rounds of obs).

obs (scoring/obs.py) chooses every group's channels from the original model's inputs. Once upstream groups
are pruned, a layer's inputs drift; He et al. 2017's asymmetric target asks the pruned layer to reproduce the
original's outputs from the pruned inputs. This module keeps obs's allocation (how many channels each group
keeps) and re-chooses which, with obs's greedy structured-OBS removal on statistics from the pruned stream:

- the round-one stream: the original rewritten so that every consumer reads only the channels obs keeps
  (a Gather before it, its weight sliced) while every producer still computes all its channels, then
  re-fitted by the least-squares recovery (`rewrite/streams.py`, then recover/); so every group's full width is
  computed from pruned, re-fitted inputs. (`masked_model`, the same without the re-fit: consumers' dropped
  input weights zeroed, was measured too);
- at every consumer, X_p (that model's input features) and X_d (the original's) are captured at the same
  sampled output positions; H = X_p^T X_p / N + lambda I, and the target is the ridge solution

      W~ = argmin ||W X_d - W' X_p||^2 + lambda ||W' - W||^2 = W (X_d^T X_p / N + lambda I) H^-1
         = W + W (X_d^T X_p - X_p^T X_p) / N H^-1

  (the ridge pulls towards the original weights, as recovery's does: with X_p = X_d the target is W and the
  choice is obs's own);
- obs's `Problem`s with weight W~ and H^-1 from X_p are removed greedily (`greedy_order_scores`); a group
  read by several consumers sums over them; each group keeps as many channels as round one gave it.

Pruning and least-squares recovery then run as usual on the new choice. Every group is re-chosen on the
round-one stream (not yet in topological order, with the choices before it already re-chosen): a test of
whether statistics from the pruned stream choose better, not the sequential engine of issue 13.
"""

from __future__ import annotations

import numpy as np

from ..allocate import select
from ..calib.capture import stream_activations
from ..calib.data import held_out
from ..calib.stats import capture_batch_size
from .consumers import find_consumers
from .obs import MAX_FEATURES, GramFold, damped_inverse, greedy_order_scores, quadratic


class CrossFold(GramFold):
    """obs's Gram fold of one consumer, on the pruned stream's features X_p, with the cross products
    X_d^T X_p and X_d^T X_d of the original's features X_d at the same points (fit samples only)."""

    def __init__(self, consumer, samples: int, batches: int, rng):
        super().__init__(consumer, samples, batches, rng)
        self.cross = np.zeros_like(self.gram)  # X_d^T X_p
        self.gram_d = np.zeros_like(self.gram)  # X_d^T X_d

    def add_pair(self, original: np.ndarray, pruned: np.ndarray, start: int, size: int) -> None:
        flat = self.consumer.batch_points(self.chosen, start, size)
        if not len(flat):
            return
        fit = ~held_out(start + flat // self.consumer.positions)
        x_d, x_p = (_with_ones(self.consumer.points(a, flat)[fit]) for a in (original, pruned))
        self.gram += x_p.T @ x_p
        self.cross += x_d.T @ x_p
        self.gram_d += x_d.T @ x_d
        self.count += len(x_p)

    def problems(self, analysis) -> list:
        """obs's problems on X_p, each with the asymmetric target as its weights and its energy measured on
        the original's outputs."""
        found = super().problems(analysis)
        count = max(self.count, 1)
        targets = {}
        for _, problem in found:
            key = problem.block
            if key not in targets:
                take = _block_columns(self.consumer, problem.block, len(self.gram))
                gram = self.gram[np.ix_(take, take)] / count
                cross = self.cross[np.ix_(take, take)] / count
                weight = problem.weight  # the original's, as obs reads it
                targets[key] = (asymmetric_target(weight, cross, gram, problem.hinv),
                                quadratic(weight, self.gram_d[np.ix_(take, take)] / count))
            problem.weight, energy = targets[key]
            problem.energy = energy if energy > 0 else problem.energy
            problem.held = None
        return found


def _with_ones(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.astype(np.float32, copy=False), np.ones((len(x), 1), np.float32)], axis=1)


def _block_columns(consumer, block: int, features: int) -> np.ndarray:
    """The feature columns (and the bias column) of one conv block, as `GramFold.problems` takes them."""
    per_block_in = consumer.channels // consumer.groups
    channels = np.arange(block * per_block_in, (block + 1) * per_block_in)
    columns = (channels[:, None] * consumer.kernel + np.arange(consumer.kernel)[None, :]).ravel()
    return np.append(columns, features - 1)


def asymmetric_target(weight: np.ndarray, cross: np.ndarray, gram: np.ndarray, hinv: np.ndarray) -> np.ndarray:
    """W~ = W + W (C - G) H^-1 (C = X_d^T X_p / N, G = X_p^T X_p / N, H = G + lambda I): the minimiser of
    ||W X_d - W' X_p||^2 / N + lambda ||W' - W||^2; exactly W when C = G."""
    return weight + (weight @ (cross - gram)) @ hinv


def reselect(analysis, keep: dict[int, np.ndarray], original, pruned, calibration, seed: int = 0,
             batch_size: int | None = None, fixed_batch: int | None = None) -> dict[int, np.ndarray]:
    """New kept positions per group of `analysis` (the original's): as many as `keep` has, chosen by obs's
    greedy removal on the inputs of `pruned` (every group's full width, computed from the pruned groups before
    it: `rewrite.streams.gathered_model` re-fitted, or
    `masked_model`) against the original's outputs. Groups no consumer reads
    keep their round-one choice. The seeds of the sampled points are obs's (`obs.gram_folds`)."""
    consumers = [c for c in find_consumers(analysis) if c.fan_in * c.groups < MAX_FEATURES]
    if not consumers:
        return dict(keep)
    names = sorted({c.tensor for c in consumers})
    batch = capture_batch_size(analysis.shapes, names, batch_size, fixed_batch)
    batches = -(-calibration.count // batch)
    folds = [CrossFold(c, calibration.count, batches, np.random.default_rng([seed, i])) for i, c in enumerate(consumers)]
    start = 0
    for acts_d, acts_p in zip(stream_activations(original, names, calibration, batch, progress="re-selection"),
                              stream_activations(pruned, names, calibration, batch)):
        size = len(next(iter(acts_d.values())))
        for fold in folds:
            fold.add_pair(acts_d[fold.consumer.tensor], acts_p[fold.consumer.tensor], start, size)
        start += size
    by_group: dict[int, list] = {}
    for fold in folds:
        for g, problem in fold.problems(analysis):
            by_group.setdefault(g, []).append(problem)
    scores, counts = {}, {}
    for group in analysis.prunable_groups():
        kept = keep.get(group.index)
        if kept is None:
            continue
        counts[group.index] = len(kept)
        if by_group.get(group.index) and group.channels > 1 and len(kept) < group.channels:
            scores[group.index] = greedy_order_scores(by_group[group.index], group.channels)
        else:  # the round-one choice, ranked first
            scores[group.index] = np.zeros(group.channels)
            scores[group.index][kept] = 1.0
    return select(analysis, scores, counts)
