"""The scorer registry and the per-unit accumulation every scorer uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InternalError, UsageError


class Allocation(ABC):
    """What a scorer that brings its own budget leaves in `ScoringContext.allocation`: it turns its scores
    into keep counts that meet a target (PFP: one error bound for the whole network), where other scorers
    get the --filters ratio applied to their scores."""

    global_note: str = ""  # the report's note when --global is asked for: the budget spans all groups already

    @abstractmethod
    def keep_counts(self, analysis, scores: dict[int, np.ndarray], target, round_to) -> tuple[dict[int, int], dict]:
        """Keep counts of every prunable group meeting `target` (budget.Target), and the report's summary."""

    def select(self, analysis, scores, counts: dict[int, int], keep: dict[int, np.ndarray], mode: str,
               seed: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """(kept positions, per-unit weight scales) in the scorer's selection `mode`; by default `keep`."""
        return keep, {}

    def summary(self, mode: str) -> dict:
        """What the report's scoring section says about the allocation."""
        return {}


@dataclass(frozen=True)
class Scorer:
    score: Callable  # (analysis, context) -> {group index: scores}
    allocates: bool = False  # leaves an Allocation in context.allocation: the scorer meets budgets itself
    uses_data: bool = True  # reads the calibration data (False: weights only)


SCORERS: dict[str, Scorer] = {}


@dataclass
class ScoringContext:
    seed: int = 0
    calibration: object = None  # a CalibrationSet, for data-informed scorers
    notes: list[str] = field(default_factory=list)  # what the report should say about scoring
    model: object = None  # what activations are captured from: the normalised original ModelProto, or the
    # io.ModelFile to read it from while the pipeline holds no parsed copy (calib.capture accepts either)
    batch_size: int | None = None  # samples per capture batch (None: from a memory budget)
    fixed_batch: int | None = None  # the model's fixed batch size, when its input has one
    pfp_points: int | None = None  # (input, position) points per layer for PFP (None: from a work budget)
    allocation: Allocation | None = None  # set by a scorer that brings its own budget
    allocating: bool = True  # False: the keep counts are given (a step of --steps), only the ranking is used
    hold_out: bool = False  # keep the held-out calibration samples (calib.data.held_out) out of the scores

    def fit_data(self):
        """The calibration samples a scorer may fit its statistics to. A scorer that checks itself on the
        held-out samples (obs) reads `calibration` and leaves them out of its fit itself."""
        return self.calibration.part(held=False) if self.hold_out else self.calibration


def register_scorer(name: str, allocates: bool = False, uses_data: bool = True):
    def decorate(fn):
        SCORERS[name] = Scorer(fn, allocates, uses_data)
        return fn

    return decorate


def score(analysis, name: str, context: ScoringContext) -> dict[int, np.ndarray]:
    if name not in SCORERS:
        raise UsageError(f"unknown scorer '{name}': choose one of {', '.join(sorted(SCORERS))}")
    scorer = SCORERS[name]
    context.allocation = None
    scores = scorer.score(analysis, context)
    if scorer.allocates != (context.allocation is not None):
        raise InternalError(f"scorer '{name}' {'left no' if scorer.allocates else 'left an'} allocation in its "
                            "context, against its registration")
    return scores


def accumulate(analysis, group, ids: np.ndarray, values: np.ndarray, into: np.ndarray) -> None:
    """Add per-channel `values` (for global `ids`) into the group's per-unit scores."""
    np.add.at(into, analysis.position[analysis.label[ids]], values)
