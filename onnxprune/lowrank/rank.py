"""Rank selection: a fraction of each layer's rank, the smallest rank within an error, or a MACs budget.

Each layer offers options (subspaces j, rank r) that lower its MACs and params, each with the relative
error of its decomposition (`Decomposition.errors`). The budget mode follows ALDS (Liebenwein et al.,
NeurIPS 2021): minimise the largest relative error over all layers subject to the budget. For an error
level e every layer takes its cheapest option with error <= e (or stays dense), which is optimal for that
level; the savings grow with e, so a bisection over the levels finds the smallest e whose savings meet
the budget. Unlike the paper's iterative search over j this evaluates every (j, r) of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .decompose import Decomposition
from .layers import Layer


@dataclass
class Choice:
    rank: int
    subspaces: int
    error: float  # estimated relative error of the layer at this rank


@dataclass
class Options:
    """Every (j, r) of one layer that lowers its cost, as parallel arrays."""

    layer: Layer
    decompositions: dict[int, Decomposition]
    subspaces: np.ndarray
    ranks: np.ndarray
    errors: np.ndarray
    savings: np.ndarray  # MACs saved against the dense layer

    @classmethod
    def of(cls, layer: Layer, decompositions: dict[int, Decomposition]) -> "Options":
        js, rs, errs, saves = [], [], [], []
        for j, dec in sorted(decompositions.items()):
            ranks = np.arange(1, min(dec.max_rank, layer.break_even_rank(j)) + 1)
            js.append(np.full(len(ranks), j))
            rs.append(ranks)
            errs.append(dec.errors[ranks])
            saves.append(layer.macs() - layer.positions * ranks * (layer.in_features + j * layer.out_features))
        return cls(layer, decompositions, *(np.concatenate(a) if a else np.zeros(0) for a in (js, rs, errs, saves)))

    def best_within(self, max_error: float) -> Choice | None:
        """The option saving most with error <= max_error (ties: fewest subspaces, then lowest rank)."""
        gains = np.where(self.errors <= max_error, self.savings, -1)
        if not len(gains) or gains.max() <= 0:
            return None
        i = int(np.argmax(gains))
        return Choice(int(self.ranks[i]), int(self.subspaces[i]), float(self.errors[i]))


def by_fraction(layer: Layer, fraction: float) -> tuple[Choice | None, str]:
    """Rank = fraction of the layer's full rank (plain decomposition, j = 1); its error is filled in later."""
    full = layer.full_rank(1)
    rank = max(1, int(round(fraction * full)))
    if rank > layer.break_even_rank(1):
        return None, (f"rank {rank} of {full} does not lower MACs and params "
                      f"(it pays only up to rank {layer.break_even_rank(1)})")
    return Choice(rank, 1, float("nan")), ""


def by_error(options: Options, max_error: float) -> tuple[Choice | None, str]:
    """The cheapest option within relative error `max_error`."""
    choice = options.best_within(max_error)
    if choice is not None:
        return choice, ""
    dec = options.decompositions[1]
    needed = dec.smallest_rank(max_error)
    return None, (f"error {max_error:g} needs rank {needed} of {dec.max_rank}, which does not lower MACs and "
                  f"params (it pays only up to rank {options.layer.break_even_rank(1)})")


def by_budget(all_options: list[Options], saving_needed: int) -> tuple[dict[str, Choice], float]:
    """Choices that save at least `saving_needed` MACs with the smallest worst error (ALDS's objective).

    Returns the choices by layer name and the worst error level used; when even the cheapest options
    cannot save enough, those cheapest options.
    """
    levels = np.unique(np.concatenate([o.errors for o in all_options])) if all_options else np.zeros(0)
    if saving_needed <= 0 or not len(levels):
        return {}, 0.0

    def choices_at(level: float) -> dict[str, Choice]:
        picked = {o.layer.name: o.best_within(level) for o in all_options}
        return {name: c for name, c in picked.items() if c is not None}

    def saving(level: float) -> int:
        return sum(o.layer.macs() - o.layer.macs(c.rank, c.subspaces)
                   for o in all_options if (c := o.best_within(level)) is not None)

    lo, hi = 0, len(levels) - 1
    if saving(levels[hi]) < saving_needed:
        return choices_at(levels[hi]), float(levels[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        if saving(levels[mid]) >= saving_needed:
            hi = mid
        else:
            lo = mid + 1
    return choices_at(levels[lo]), float(levels[lo])
