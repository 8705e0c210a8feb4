"""Re-choosing which channels each group keeps, on the pruned model's own inputs (obs, then again).

obs (scoring/obs.py) chooses every group's channels from the original model's inputs. Once upstream groups
are pruned, a layer's inputs drift; He et al. 2017's asymmetric target asks the pruned layer to reproduce the
original's outputs from the pruned inputs. This module keeps obs's allocation (how many channels each group
keeps) and re-chooses which, with obs's greedy structured-OBS removal on statistics from a pruned stream:

- the stream: the original rewritten so that every consumer reads only the channels obs keeps (a Gather
  before it, its weight sliced) while every producer still computes all its channels (`rewrite/streams.py`),
  re-fitted by least squares as recovery does (recover/); so every group's full width is computed from
  pruned, re-fitted inputs;
- at every consumer, X_p (that model's input features) and X_d (the original's) are captured at the same
  sampled output positions; H = X_p^T X_p / N + lambda I, and the target is the ridge solution

      W~ = argmin ||W X_d - W' X_p||^2 + lambda ||W' - W||^2 = W (X_d^T X_p / N + lambda I) H^-1
         = W + W (X_d^T X_p - X_p^T X_p) / N H^-1

  (the ridge pulls towards the original weights, as recovery's does: with X_p = X_d the target is W and the
  choice is obs's own);
- obs's `Problem`s with weight W~ and H^-1 from X_p are removed greedily (`greedy_order_scores`); a group
  read by several consumers sums over them; each group keeps as many channels as round one gave it.

Two ways to walk the stream:

- `reselect` (`reselect=True`; `"masked"`: the stream not re-fitted, only the dropped inputs' weights
  zeroed): the stream of obs's choice is re-fitted whole by `recover`, then every group is chosen again on it
  at once;
- `reselect_sequential` (`reselect="sequential"`): the groups are chosen again in topological order during
  one level-by-level walk, each on a stream whose earlier consumers already read the new choices and are
  re-fitted (issue 13's sequential engine); no separate recovery pass.

Pruning and least-squares recovery then run as usual on the new choice.
"""

from __future__ import annotations

import numpy as np

from ..allocate import choose_kept, select
from ..calib.capture import stream_activations
from ..calib.data import held_out
from ..calib.stats import capture_batch_size
from ..progress import bar as progress_bar
from ..recover.layers import Initializers, find_layers, tensor_levels
from ..recover.lstsq import LstsqFit
from ..recover.passes import fit_level
from ..recover.stream import Stream
from .consumers import find_consumers
from .obs import MAX_FEATURES, GramFold, block_features, greedy_order_scores, quadratic, square_block


class CrossFold(GramFold):
    """obs's Gram fold of one consumer, on the pruned stream's features X_p, with the cross products
    X_d^T X_p and X_d^T X_d of the original's features X_d at the same points (fit samples only)."""

    def __init__(self, consumer, samples: int, batches: int, rng):
        super().__init__(consumer, samples, batches, rng, may_keep_rows=False)  # `add_pair` folds its products
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
        the original's outputs (no held-out rows: re-selection has no curve)."""
        self.cross /= max(self.count, 1)
        self.gram_d /= max(self.count, 1)
        found = super().problems(analysis)  # divides self.gram likewise
        for _, problem in found:
            take = block_features(problem.consumer, problem.block)
            cross, gram, gram_d = (square_block(m, take) for m in (self.cross, self.gram, self.gram_d))
            weight = problem.weight  # the original's, as obs reads it
            energy = quadratic(weight, gram_d)
            problem.weight = asymmetric_target(weight, cross, gram, problem.hinv)
            problem.energy = energy if energy > 0 else problem.energy
        return found


def _with_ones(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.astype(np.float32, copy=False), np.ones((len(x), 1), np.float32)], axis=1)


def asymmetric_target(weight: np.ndarray, cross: np.ndarray, gram: np.ndarray, hinv: np.ndarray) -> np.ndarray:
    """W~ = W + W (C - G) H^-1 (C = X_d^T X_p / N, G = X_p^T X_p / N, H = G + lambda I): the minimiser of
    ||W X_d - W' X_p||^2 / N + lambda ||W' - W||^2; exactly W when C = G."""
    return weight + (weight @ (cross - gram)) @ hinv


def reselect(analysis, keep: dict[int, np.ndarray], original, pruned, calibration, seed: int = 0,
             batch_size: int | None = None, fixed_batch: int | None = None) -> dict[int, np.ndarray]:
    """New kept positions per group of `analysis` (the original's): as many as `keep` has, chosen by obs's
    greedy removal on the inputs of `pruned` (every group's full width, computed from the pruned groups before
    it: `rewrite.streams.gathered_model` re-fitted, or `masked_model`) against the original's outputs, every
    group at once. Groups no consumer reads keep their round-one choice. The sampled points are obs's."""
    _, folds = cross_folds(analysis, calibration, seed, batch_size, fixed_batch)
    if not folds:
        return dict(keep)
    names = sorted({f.consumer.tensor for f in folds})
    batch = capture_batch_size(analysis.shapes, names, batch_size, fixed_batch)
    _add_pairs(stream_activations(original, names, calibration, batch, progress="re-selection"),
               stream_activations(pruned, names, calibration, batch), folds, calibration.count, batch)
    by_group: dict[int, list] = {}
    for fold in folds:
        for g, problem in fold.problems(analysis):
            by_group.setdefault(g, []).append(problem)
    scores = {g: greedy_order_scores(by_group[g], analysis.groups[g].channels) for g in _pending(analysis, keep)
              if by_group.get(g)}
    return _selected(analysis, keep, scores)


def cross_folds(analysis, calibration, seed: int, batch_size: int | None, fixed_batch: int | None):
    """(every consumer of `analysis`, a `CrossFold` of each one obs scores) with obs's sampled points: the
    same batches and seeds as `obs.gram_folds`."""
    every = find_consumers(analysis)
    consumers = [c for c in every if c.fan_in * c.groups < MAX_FEATURES]
    if not consumers:
        return every, []
    batch = capture_batch_size(analysis.shapes, sorted({c.tensor for c in consumers}), batch_size, fixed_batch)
    batches = -(-calibration.count // batch)
    return every, [CrossFold(c, calibration.count, batches, np.random.default_rng([seed, i]))
                   for i, c in enumerate(consumers)]


def _add_pairs(original_batches, pruned_batches, folds, count: int, batch: int) -> None:
    """Feed `folds` the two streams' batches of their consumers' inputs (`batch` samples each, the last
    one the rest of `count`)."""
    for index, (acts_d, acts_p) in enumerate(zip(original_batches, pruned_batches)):
        start = index * batch
        size = min(batch, count - start)
        for fold in folds:
            fold.add_pair(acts_d[fold.consumer.tensor], acts_p[fold.consumer.tensor], start, size)


def _pending(analysis, keep: dict[int, np.ndarray]) -> list[int]:
    """The groups `keep` cuts: the ones whose channels are chosen again."""
    return [g.index for g in analysis.prunable_groups()
            if g.index in keep and g.channels > 1 and len(keep[g.index]) < g.channels]


def _selected(analysis, keep: dict[int, np.ndarray], scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """As many positions per group as `keep` has, the best of `scores`; a group without scores keeps its
    choice (ranked first)."""
    counts, ranked = {}, {}
    for group in analysis.prunable_groups():
        kept = keep.get(group.index)
        if kept is None:
            continue
        counts[group.index] = len(kept)
        ranked[group.index] = scores.get(group.index)
        if ranked[group.index] is None:
            ranked[group.index] = np.zeros(group.channels)
            ranked[group.index][kept] = 1.0
    return select(analysis, ranked, counts)


# ---------------------------------------------------------------- the sequential engine


def reselect_sequential(analysis, keep: dict[int, np.ndarray], original, stream_model, calibration, seed: int = 0,
                        batch_size: int | None = None, fixed_batch: int | None = None, run_batch: int = 32,
                        hold_out: bool = False, shapes: dict | None = None) -> dict[int, np.ndarray]:
    """New kept positions per group of `analysis` (the original's), as many as `keep` has, chosen group after
    group in topological order, each from inputs computed by the layers before it as they end up.

    `stream_model` is the original with every consumer reading only `keep`'s channels while every producer
    computes all its channels (`rewrite.streams.gathered_model`; not re-fitted). It is walked level by level
    (recover/passes.py's levels: a level's layers read what the re-fitted layers of earlier levels compute)
    beside the original, each node run once (`recover.stream.Stream`). At each level:

    1. the consumers whose inputs are now computed add their features X_p, and the original's X_d at the
       same points, to their `CrossFold`s;
    2. every group whose last consumer was in step 1 is chosen again by obs's greedy removal against the
       asymmetric target, over all its consumers (a consumer read earlier saw the group's channels as they are:
       a producer computes all of them whatever is kept);
    3. the level's consumers are set to read the new choices (their Gather and sliced weight) and re-fitted by
       least squares to the original's outputs, as recovery does, before the next level runs on them.

    A consumer of a group not yet chosen again (a group read at several levels) reads round one's choice
    until then. About one pass of each model and one least-squares recovery in all, whatever the depth."""
    every, folds = cross_folds(analysis, calibration, seed, batch_size, fixed_batch)
    if not folds:
        return dict(keep)
    inits = Initializers(stream_model)
    producer = {name: node for node in stream_model.graph.node for name in node.output}
    views = {v.output: v for v in find_layers(original, stream_model, shapes or {}, {})[0]}
    level_of = tensor_levels(stream_model, set(views))
    fold_level = [level_of.get(f.consumer.tensor, 0) for f in folds]
    readers: dict[int, list[int]] = {}
    for i, fold in enumerate(folds):
        for g in np.unique(analysis.group_of[fold.consumer.units]).tolist():
            readers.setdefault(g, []).append(i)
    decide_at = {g: max(fold_level[i] for i in readers[g]) for g in _pending(analysis, keep) if g in readers}
    levels = sorted(set(fold_level) | {v.level for v in views.values()})
    current = dict(keep)
    scores, by_group = {}, {}
    pruned_stream = Stream(stream_model, calibration, run_batch)
    original_stream = Stream(original, calibration, run_batch)
    bar = progress_bar(label="sequential re-selection", total=len(levels))
    try:
        for level in levels:
            at = [f for f, l in zip(folds, fold_level) if l == level]
            if at:
                names = sorted({f.consumer.tensor for f in at})
                _add_pairs(original_stream.run(names), pruned_stream.run(names), at, calibration.count, run_batch)
                for fold in at:
                    for g, problem in fold.problems(analysis):
                        if g in decide_at:
                            by_group.setdefault(g, []).append(problem)
                    fold.gram = fold.cross = fold.gram_d = None  # its problems hold what is still needed
            for g in sorted(g for g, l in decide_at.items() if l == level and by_group.get(g)):
                scores[g] = greedy_order_scores(by_group[g], analysis.groups[g].channels)
                current[g] = choose_kept(scores[g], len(keep[g]))
            members = [v for v in views.values() if v.level == level]
            for consumer in every:
                if level_of.get(consumer.tensor, 0) == level:
                    _read_choice(producer, inits, analysis, consumer, keep, current, views)
            _refit(pruned_stream, original_stream, members, inits, [seed, level],
                   -(-calibration.count // run_batch), hold_out)
            bar.update()
    finally:
        pruned_stream.close()
        original_stream.close()
        bar.close()
    return _selected(analysis, keep, scores)


def _reads(analysis, consumer, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Which of the consumer's input channels `keep` keeps (a bool mask)."""
    owners, positions = analysis.group_of[consumer.units], analysis.position[consumer.units]
    mask = np.ones(len(owners), dtype=bool)
    for g in np.unique(owners[owners >= 0]).tolist():
        if g in keep:
            mine = owners == g
            mask[mine] = np.isin(positions[mine], keep[g])
    return mask


def _read_choice(producer: dict, inits: Initializers, analysis, consumer, before: dict, now: dict,
                 views: dict) -> None:
    """Make the stream model's copy of `consumer` read the channels `now` keeps instead of those `before` kept
    (its Gather's indices and its weight, sliced from the original's; a grouped conv's weight re-zeroed).
    `producer`: the stream model's node of each tensor."""
    mask = _reads(analysis, consumer, now)
    if np.array_equal(mask, _reads(analysis, consumer, before)):
        return
    output = consumer.node.outputs[0].name
    node = producer[output]
    indices, weight = consumer.handler.narrowed(consumer.layout, consumer.node.inputs[1].values, mask)
    if indices is not None and node.input[0] == consumer.tensor:
        return  # the stream model does not narrow this consumer: it reads its whole input
    inits.set(node, 1, weight)
    if indices is not None:
        inits.set(producer[node.input[0]], 1, indices)
    view = views.get(output)
    if view is not None:  # the prior and the self-check of its re-fit
        view.weight = view.handler.to_matrix(view.layout, weight.astype(np.float64)) * view.layout.scale


def _refit(pruned: Stream, original: Stream, members: list, inits: Initializers, seed, batches: int,
           hold_out: bool) -> None:
    """Re-fit one level's layers as recovery does (`recover.passes`), their new weights written."""
    if not members:
        return
    fits = [LstsqFit(v, seed=[*seed, i], batches=batches, hold_out=hold_out) for i, v in enumerate(members)]
    updates = fit_level(pruned, original, members, fits)
    for view, update in zip(members, updates):
        if update.weight is not None or update.bias is not None:
            view.write(inits, update.weight, update.bias)
