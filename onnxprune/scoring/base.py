"""The scorer registry and the per-unit accumulation every scorer uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

SCORERS = {}


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
    pfp: object = None  # set by the pfp scorer: per-group alpha and unread groups (scoring.pfp.PFPStats)
    obs: object = None  # set by the obs scorer: per-group removal order and error curve (scoring.obs.ObsStats)


def register_scorer(name: str):
    def decorate(fn):
        SCORERS[name] = fn
        return fn

    return decorate


def score(analysis, name: str, context: ScoringContext) -> dict[int, np.ndarray]:
    if name not in SCORERS:
        raise UsageError(f"unknown scorer '{name}': choose one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name](analysis, context)


def accumulate(analysis, group, ids: np.ndarray, values: np.ndarray, into: np.ndarray) -> None:
    """Add per-channel `values` (for global `ids`) into the group's per-unit scores."""
    np.add.at(into, analysis.position[analysis.label[ids]], values)
