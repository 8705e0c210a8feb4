"""A Plan says exactly which channels survive: plain data that round-trips through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import UsageError

PLAN_VERSION = 1


@dataclass
class GroupPlan:
    sources: list[str]  # names of the layers whose output channels form the group
    channels: int  # units before pruning
    keep: list[int]  # kept unit positions, ascending


@dataclass
class Plan:
    groups: list[GroupPlan] = field(default_factory=list)
    version: int = PLAN_VERSION

    @classmethod
    def from_keep(cls, analysis, keep: dict[int, np.ndarray]) -> "Plan":
        groups = []
        for group in analysis.groups:
            if group.index in keep:
                groups.append(GroupPlan([s.node.name for s in group.sources], group.channels,
                                        [int(k) for k in np.sort(keep[group.index])]))
        return cls(groups)

    def to_keep(self, analysis) -> dict[int, np.ndarray]:
        """Resolve against a fresh analysis of the same model; refuse a plan made for another model."""
        by_sources = {tuple(s.node.name for s in g.sources): g for g in analysis.groups}
        keep = {}
        for gp in self.groups:
            group = by_sources.get(tuple(gp.sources))
            if group is None or group.channels != gp.channels or not group.prunable:
                raise UsageError(f"the plan's group {gp.sources[0]!r} does not match this model: "
                                 "was the plan made for another model or other options?")
            keep[group.index] = np.asarray(gp.keep, dtype=np.int64)
        return keep

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise UsageError(f"plan version {data.get('version')} is not supported (expected {PLAN_VERSION})")
        return cls([GroupPlan(**g) for g in data["groups"]], data["version"])
