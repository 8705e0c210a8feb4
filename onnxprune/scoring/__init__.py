"""Importance scorers: a score per unit of every prunable group (higher = more important).

A scorer is a function `(analysis, context) -> {group index: scores}` registered by name. Scoring is
separate from allocation (how many to keep) and from the rewrite, but for a scorer that brings its own
budget: it registers with `allocates=True` and leaves an `Allocation` in the context (PFP).
"""

from __future__ import annotations

from .base import SCORERS, Allocation, ScoringContext, register_scorer, score

from . import magnitude  # noqa: E402,F401  (registration)
from . import activation, obs, pfp, wanda  # noqa: E402,F401  (registration of the data-informed scorers)

__all__ = ["SCORERS", "Allocation", "ScoringContext", "register_scorer", "score"]
