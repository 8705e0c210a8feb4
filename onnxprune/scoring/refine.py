"""obs's allocation refined by measuring the whole cut (an experiment: `obs.REFINE_MEASUREMENTS`).

obs allocates from per-group error curves, each rescaled by the output error of that group cut alone
(sensitivity.py) and summed as if the groups did not interact; beyond half a group's channels a curve is
extrapolated. Here the allocation itself is measured: the model runs on held-out calibration samples
with every group cut to its allocated count at once, each consumer carrying the optimal update for all
the features it lost,

    W' = W - W_S [(H^-1)_SS]^-1 (H^-1)_{S,:},   W'_S = 0          (OBC eq. 5, S the removed features)

with S the union over the groups the layer reads (the least-squares weights on the kept features: where
the greedy's batches of one group end too). Then a bounded local search at equal budget:

1. every group's marginal measured cost: the whole cut's error after taking one step (`STEP` of its
   channels, on its keep choices) from that group, per unit of the target saved; a group at its floor is
   measured one step up instead (the error given back per unit spent);
2. a move gives one step back to a group of high marginal and takes what that costs from one of low
   marginal (the largest count of it that meets the target again), pairs in order of the difference of
   their marginals; it is kept only if the measured error drops, and then the two groups' marginals are
   measured again.

Every measurement runs the graph from the first changed layer on the samples; `budget` bounds them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..calib.data import CalibrationSet
from ..recover.passes import held_out_samples
from .sensitivity import OutputProbe

STEP = 1 / 8  # of a group's channels, given back or taken by one move (at least one keep choice)
SAMPLES = 64  # held-out calibration samples a measurement runs, at most (spread over them)


@dataclass
class Refinement:
    """What the search needs from obs's scoring: each group's problems (original weights and inverse
    Gram matrices, not changed here), the model and the calibration data."""

    problems: dict[int, list]  # group -> obs.Problem of each consumer block reading it
    model: object  # the original ModelProto
    calibration: CalibrationSet
    fixed_batch: int | None
    budget: int  # measurements at most

    def __deepcopy__(self, memo) -> "Refinement":  # read only: the cached copies of the scores share it
        return self

    def refine(self, counts: dict[int, int], movable: list[int], choices: dict[int, np.ndarray],
               channels: dict[int, int], scores: dict[int, np.ndarray], target) -> tuple[dict[int, int], dict]:
        """(refined counts, summary: the measured error before and after, measurements, moves kept)."""
        started = time.perf_counter()
        layers = sorted({p.consumer.node.outputs[0].name for ps in self.problems.values() for p in ps})
        samples = None if (self.fixed_batch or 1) > 1 else held_out_samples(self.calibration).spread(SAMPLES)
        order = {g: np.argsort(scores[g], kind="stable") for g in movable}  # lowest score removed first
        cache: dict = {}
        with OutputProbe(self.model, self.calibration, self.fixed_batch, layers, 1, samples) as probe:
            def error(trial: dict[int, int]) -> float:
                removed = {g: order[g][:channels[g] - trial[g]] for g in movable if trial[g] < channels[g]}
                problems, weights = joint_weights(self.problems, removed, cache)
                return probe.errors(problems, [weights])[0] if problems else 0.0

            refined, summary = local_search(counts, movable, choices, channels, target, error, self.budget)
            summary["samples"] = probe.samples.count
        summary["seconds"] = round(time.perf_counter() - started, 2)
        return refined, summary


def joint_weights(problems: dict[int, list], removed: dict[int, np.ndarray], cache: dict | None = None
                  ) -> tuple[list, list[np.ndarray]]:
    """(one problem per changed consumer block, its updated weights in obs's layout) with every group's
    `removed` unit positions cut at once."""
    blocks: dict[tuple, tuple] = {}
    for g, units in removed.items():
        for p in problems.get(g, []):
            cols = [p.columns[u] for u in units.tolist() if u in p.columns]
            if cols:
                blocks.setdefault((id(p.consumer), p.block), (p, []))[1].extend(cols)
    cache = {} if cache is None else cache
    found, weights = [], []
    for key, (problem, cols) in blocks.items():
        features = np.unique(np.concatenate(cols))
        cache_key = (key, features.tobytes())
        if cache_key not in cache:
            cache[cache_key] = refitted(problem.weight, problem.hinv, features)
        found.append(problem)
        weights.append(cache[cache_key])
    return found, weights


def refitted(weight: np.ndarray, hinv: np.ndarray, features: np.ndarray) -> np.ndarray:
    """`weight` [outputs, features] with `features` removed and the rest optimally updated (OBC eq. 5)."""
    block = hinv[np.ix_(features, features)]
    step = np.linalg.solve((block + block.T) / 2, weight[:, features].T).T
    updated = weight - step @ hinv[features, :]
    updated[:, features] = 0.0
    return updated


def stepped(choices: np.ndarray, count: int, channels: int, direction: int) -> int | None:
    """The keep choice one step (`STEP` of the channels, at least the next choice) above or below `count`."""
    size = max(1, round(STEP * channels))
    if direction > 0:
        options = choices[choices > count]
        far = options[options >= count + size]
        return None if not len(options) else int(far[0] if len(far) else options[-1])
    options = choices[choices < count]
    far = options[options <= count - size]
    return None if not len(options) else int(far[-1] if len(far) else options[0])


def local_search(counts: dict[int, int], movable: list[int], choices: dict[int, np.ndarray],
                 channels: dict[int, int], target, error: Callable[[dict[int, int]], float],
                 budget: int) -> tuple[dict[int, int], dict]:
    """Moves of one step between two groups at equal target (see the module docstring), each kept only
    if `error` (the measured error of counts) drops; at most `budget` calls of `error`."""
    current, base = dict(counts), error(counts)
    before, used, kept, rejected, tried = base, 1, 0, 0, set()
    marginal: dict[int, float] = {}

    def measure_marginal(g: int) -> None:
        nonlocal used
        for direction in (-1, 1):
            count = stepped(choices[g], current[g], channels[g], direction)
            if count is None:
                continue
            trial = {**current, g: count}
            spent = target.measure(trial) - target.measure(current)
            if spent == 0:
                continue
            used += 1
            marginal[g] = (error(trial) - base) / -spent  # error per unit saved (down) or given back per unit (up)
            return
        marginal.pop(g, None)

    # largest saving per step first, so that a small budget measures the groups that matter most
    by_saving = sorted(movable, key=lambda g: _step_saving(g, current, choices, channels, target), reverse=True)
    for g in by_saving:
        if used >= budget:
            break
        measure_marginal(g)
    while used < budget:
        move = _next_move(current, marginal, choices, channels, target, tried)
        if move is None:
            break
        trial, (a, b) = move
        used += 1
        measured = error(trial)
        if measured < base:
            current, base, kept = trial, measured, kept + 1
            for g in (a, b):
                if used < budget:
                    measure_marginal(g)
        else:
            rejected += 1
            tried.add((a, b, current[a], current[b]))
    return current, {"output_error": [float(before), float(base)], "measurements": used, "moves": kept,
                     "rejected": rejected}


def _step_saving(g: int, counts: dict[int, int], choices, channels, target) -> float:
    count = stepped(choices[g], counts[g], channels[g], -1)
    count = count if count is not None else stepped(choices[g], counts[g], channels[g], 1)
    return 0.0 if count is None else abs(target.measure(counts) - target.measure({**counts, g: count}))


def _next_move(current, marginal, choices, channels, target, tried) -> tuple[dict[int, int], tuple] | None:
    """The untried move of largest marginal difference that meets the target: one step back to `a`, the
    largest count of `b` below its own that pays for it."""
    pairs = sorted(((marginal[a] - marginal[b], a, b) for a in marginal for b in marginal
                    if a != b and marginal[a] > marginal[b]), reverse=True)
    for _, a, b in pairs:
        if (a, b, current[a], current[b]) in tried:
            continue
        up = stepped(choices[a], current[a], channels[a], 1)
        if up is None:
            tried.add((a, b, current[a], current[b]))
            continue
        count = _largest_fitting(choices[b][choices[b] < current[b]], {**current, a: up}, b, target)
        if count is None:
            tried.add((a, b, current[a], current[b]))
            continue
        return {**current, a: up, b: count}, (a, b)
    return None


def _largest_fitting(options: np.ndarray, counts: dict[int, int], g: int, target) -> int | None:
    """The largest of the ascending `options` for group g's count that meets the target (bisected: the
    measure grows with a count)."""
    lo, hi = 0, len(options)  # options[:lo] fit, options[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if target.measure({**counts, g: int(options[mid])}) <= target.limit:
            lo = mid + 1
        else:
            hi = mid
    return int(options[lo - 1]) if lo else None
