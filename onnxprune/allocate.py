"""How many units each prunable group keeps, and which: uniform or global ranking, `round_to`, >= 1."""

from __future__ import annotations

import math

import numpy as np

DEFAULT_ROUND_TO = 8  # without --round-to: onnxruntime's CPU convolutions are fastest at multiples of 8 (docs/architecture.md)
DEFAULT_ROUND_MIN_CHANNELS = 16


def group_round_to(round_to: int | dict | None, group: int) -> int | None:
    """The `round_to` of one group: `round_to` itself, or the group's entry when it maps groups to multiples
    (--round-to auto, `budget.LatencyPredictor.favoured_multiples`; a group without one: None, the default)."""
    return round_to.get(group) if isinstance(round_to, dict) else round_to


def round_step(channels: int, round_to: int | None, width: int = 1) -> int:
    """The multiple of units (each `width` channels wide) a group of `channels` units keeps: what makes the
    channels kept a multiple of `round_to` (None: 8 for groups of 16+ channels, unless no cut would be left,
    as for a grouped conv's units of 5 channels, 8 of them); units of 8 channels (attention heads) need none."""
    step = round_to if round_to is not None else (DEFAULT_ROUND_TO if channels * width >= DEFAULT_ROUND_MIN_CHANNELS else 1)
    step //= math.gcd(step, width)
    return 1 if round_to is None and step >= channels else step


def round_keep(keep: int, channels: int, round_to: int | None, width: int = 1) -> int:
    """Round a keep count of units, each `width` channels wide, to the group's `round_step`."""
    step = round_step(channels, round_to, width)
    if step > 1 and keep < channels:
        keep = max(step, int(round(keep / step)) * step)
    return int(min(max(keep, 1), channels))


def keep_counts(analysis, scores: dict[int, np.ndarray], ratio: float, global_ranking: bool,
                round_to: int | None = None) -> dict[int, int]:
    """Units to keep per prunable group for removing fraction `ratio` (per group, or over all)."""
    groups = analysis.prunable_groups()
    if not global_ranking:
        raw = {g.index: g.channels - int(np.floor(ratio * g.channels + 1e-9)) for g in groups}
    else:
        raw = _global_counts(groups, scores, ratio)
    return {g.index: round_keep(raw[g.index], g.channels, group_round_to(round_to, g.index), g.width) for g in groups}


def _global_counts(groups, scores, ratio) -> dict[int, int]:
    """Rank every unit of every group together, each group's scores divided by its mean."""
    normalized, owner = [], []
    for g in groups:
        s = scores[g.index].astype(np.float64)
        mean = s.mean()
        normalized.append(s / mean if mean > 0 else np.zeros_like(s))
        owner.append(np.full(g.channels, g.index))
    values, owner = np.concatenate(normalized), np.concatenate(owner)
    n_remove = int(np.floor(ratio * len(values) + 1e-9))
    removed = owner[np.argsort(values, kind="stable")[:n_remove]]
    gone = {g.index: int((removed == g.index).sum()) for g in groups}
    return {g.index: g.channels - gone[g.index] for g in groups}


def choose_kept(scores: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` highest scores, ascending (ties: lower position wins)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count])


def select(analysis, scores: dict[int, np.ndarray], counts: dict[int, int]) -> dict[int, np.ndarray]:
    """Kept unit positions per group, topped up so that no tensor loses all its channels."""
    keep = {gi: choose_kept(scores[gi], n) for gi, n in counts.items()}
    return ensure_nonempty(analysis, scores, keep)


def ensure_nonempty(analysis, scores, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """A Split or Slice output can lose all its channels even when its group keeps some: keep its best."""
    kept_label = np.ones(len(analysis.label), dtype=bool)
    for group in analysis.groups:
        if group.index in keep:
            dropped = np.ones(group.channels, dtype=bool)
            dropped[keep[group.index]] = False
            kept_label[group.unit_labels[dropped]] = False
    for cmap in analysis.maps.values():
        labels = analysis.label[cmap.ids].ravel()
        if kept_label[labels].any():
            continue
        positions = analysis.position[labels]
        group_index = int(analysis.group_of[labels[0]])
        best = positions[np.argmax(scores[group_index][positions])]
        keep[group_index] = np.union1d(keep[group_index], [best])
        kept_label[analysis.groups[group_index].unit_labels[best]] = True
    return keep
