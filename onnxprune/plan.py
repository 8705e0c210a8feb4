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
    # PFP's sample mode: per kept unit, the factor its consumers' input weights are multiplied by
    # (count / (m p), the paper's unbiased re-weighting); None: weights are only sliced
    scale: list[float] | None = None


@dataclass
class LowRankPlan:
    node: str  # name of the factorized Conv, Gemm or MatMul (in the channel-pruned graph)
    rank: int  # rank kept per input subspace
    subspaces: int = 1  # ALDS input-channel subspaces (groups of the first factor); 1 for Gemm/MatMul


@dataclass
class Plan:
    groups: list[GroupPlan] = field(default_factory=list)
    version: int = PLAN_VERSION
    lowrank: list[LowRankPlan] = field(default_factory=list)  # layers factorized after channel pruning

    @classmethod
    def from_keep(cls, analysis, keep: dict[int, np.ndarray], scales: dict[int, np.ndarray] | None = None) -> "Plan":
        """`scales`: optional per-unit weight factors per group (full length; only kept units are stored)."""
        groups = []
        for group in analysis.groups:
            if group.index in keep:
                kept = np.sort(keep[group.index])
                scale = (scales or {}).get(group.index)
                groups.append(GroupPlan(list(source_names(group)), group.channels,
                                        [int(k) for k in kept],
                                        None if scale is None else [float(scale[k]) for k in kept]))
        return cls(groups)

    def to_scales(self, analysis) -> dict[int, np.ndarray]:
        """Per-unit weight factors of the groups that have them (1 for units without), for the rewrite."""
        keep = self.to_keep(analysis)
        by_sources = {source_names(g): g for g in analysis.groups}
        scales = {}
        for gp in self.groups:
            if gp.scale is None:
                continue
            group = by_sources[tuple(gp.sources)]
            if len(gp.scale) != len(gp.keep) or not all(np.isfinite(gp.scale)):
                raise UsageError(f"the plan's group {gp.sources[0]!r} has a 'scale' list that does not match "
                                 "its 'keep' list: give one finite factor per kept channel")
            factors = np.ones(group.channels)
            factors[keep[group.index]] = gp.scale
            scales[group.index] = factors
        return scales

    def to_keep(self, analysis) -> dict[int, np.ndarray]:
        """Resolve against a fresh analysis of the same model; refuse a plan made for another model."""
        by_sources = {source_names(g): g for g in analysis.groups}
        keep = {}
        for gp in self.groups:
            group = by_sources.get(tuple(gp.sources))
            if group is None or group.channels != gp.channels or not group.prunable:
                raise UsageError(f"the plan's group {gp.sources[0]!r} does not match this model: "
                                 "was the plan made for another model or other options?")
            kept = np.asarray(gp.keep, dtype=np.int64)
            if kept.size == 0 or kept.min() < 0 or kept.max() >= gp.channels or len(np.unique(kept)) != kept.size:
                raise UsageError(f"the plan's group {gp.sources[0]!r} has an invalid 'keep' list: give at least one "
                                 f"distinct position in 0..{gp.channels - 1} (was the plan edited by hand?)")
            keep[group.index] = kept
        return keep

    def then(self, later: "Plan") -> "Plan":
        """This plan followed by `later`, a plan made on the model this one produced (a step of --steps):
        one plan for the original model. Weight scales cannot be composed and are refused."""
        later_groups = {tuple(gp.sources): gp for gp in later.groups}
        groups = []
        for gp in self.groups:
            after = later_groups.get(tuple(gp.sources))
            if gp.scale is not None or (after is not None and after.scale is not None):
                raise UsageError("weight scales (--pfp-mode sample) cannot be composed over --steps: use one step")
            keep = gp.keep if after is None else [gp.keep[k] for k in after.keep]
            groups.append(GroupPlan(gp.sources, gp.channels, keep))
        return Plan(groups, self.version, later.lowrank)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise UsageError(f"plan version {data.get('version')} is not supported (expected {PLAN_VERSION})")
        return cls([GroupPlan(**g) for g in data["groups"]], data["version"],
                   [LowRankPlan(**entry) for entry in data.get("lowrank", [])])


def source_names(group) -> tuple[str, ...]:
    """The names of the layers whose output channels form an analysis group: what identifies it in a plan
    (and across the steps of --steps)."""
    return tuple(s.node.name for s in group.sources)
