"""Global budgets: per-group keep counts that meet a target number of channels or of MACs.

- PFP (paper Sec. 3.3): one relative error eps for the whole network; each group keeps u(eps) channels
  (scoring/pfp.py); eps is bisected on a log scale over [1e-300, 1e150] until the network meets the
  target: `--filters R` (fraction of all prunable channels removed) or `--target-macs F` (fraction of
  MACs kept).
- Other scorers with `--target-macs F`: the `--filters` ratio (uniform per group, or global) is
  bisected instead.

MACs are estimated from the analysis without rewriting: every Conv/Gemm/MatMul that creates channels
costs (its MACs) x (kept fraction of its input channels) x (kept fraction of its output channels), every
other computing op its MACs times the kept fraction of the channels it carries. A group keeping k of C
units is taken to keep k/C of the positions its units occupy in each tensor (exact but for Split/Slice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .allocate import ensure_nonempty, keep_counts, round_keep, select
from .scoring.pfp import keep_for_eps, sample_channels
from .validate.cost import node_macs

log = logging.getLogger(__name__)

EPS_RANGE = (1e-300, 1e150)
BISECTION_STEPS = 200


@dataclass
class CostModel:
    """MACs as a function of per-group keep counts (see the module docstring)."""

    groups: list[int]  # prunable group indices, the columns of `removed_share`
    channels: np.ndarray  # units per group
    removed_share: np.ndarray  # [tensors, groups]: share of a tensor's positions owned by each group
    base: np.ndarray  # MACs of every costed node at full size
    inputs: np.ndarray  # tensor row of the fraction that scales the node's input side (-1: none)
    outputs: np.ndarray  # likewise for the output side

    @classmethod
    def build(cls, analysis) -> "CostModel":
        groups = [g.index for g in analysis.prunable_groups()]
        column = {g: i for i, g in enumerate(groups)}
        rows: dict[str, int] = {}
        shares: list[np.ndarray] = []

        def row(tensor) -> int:
            cmap = analysis.maps.get(tensor.name) if tensor is not None else None
            if cmap is None:
                return -1
            if tensor.name not in rows:
                owners = analysis.group_of[analysis.label[cmap.ids.ravel()]]
                share = np.zeros(len(groups))
                for g, n in zip(*np.unique(owners[owners >= 0], return_counts=True)):
                    if g in column:
                        share[column[g]] = n / owners.size
                rows[tensor.name] = len(shares)
                shares.append(share)
            return rows[tensor.name]

        sources = {id(s.node) for g in analysis.groups for s in g.sources}
        base, ins, outs = [], [], []
        for node in analysis.graph.nodes:
            macs = node_macs(OnnxExporter.export_node(node), analysis.shapes, {})
            if not macs:
                continue
            out_row = row(node.outputs[0]) if node.outputs else -1
            in_row = row(node.inputs[0]) if node.inputs else -1
            if id(node) not in sources:  # channels pass through: scale by the side that carries them
                in_row, out_row = (-1, out_row) if out_row >= 0 else (in_row, -1)
            base.append(macs)
            ins.append(in_row)
            outs.append(out_row)
        share_matrix = np.array(shares).reshape(len(shares), len(groups))
        channels = np.array([analysis.groups[g].channels for g in groups], dtype=np.float64)
        return cls(groups, channels, share_matrix, np.array(base, dtype=np.float64),
                   np.array(ins, dtype=np.int64), np.array(outs, dtype=np.int64))

    @property
    def full(self) -> float:
        return float(self.base.sum())

    def macs(self, counts: dict[int, int]) -> float:
        kept = np.array([counts.get(g, c) for g, c in zip(self.groups, self.channels)], dtype=np.float64)
        fraction = 1.0 - (self.removed_share * (1.0 - kept / self.channels)).sum(1)  # no BLAS: see scoring/pfp.py
        fraction = np.append(fraction, 1.0)  # row -1: no tracked channels
        return float((self.base * fraction[self.inputs] * fraction[self.outputs]).sum())


# ---------------------------------------------------------------- PFP: search eps


@dataclass
class PFPGroup:
    index: int
    probabilities: np.ndarray
    total: float  # S_l
    alpha: float


def pfp_groups(analysis, scores: dict[int, np.ndarray], stats) -> list[PFPGroup]:
    found = []
    for group in analysis.prunable_groups():
        if group.index in stats.unread:
            continue
        sens = np.asarray(scores[group.index], dtype=np.float64)
        total = float(sens.sum())
        probabilities = sens / total if total > 0 else np.zeros_like(sens)
        found.append(PFPGroup(group.index, probabilities, total, stats.alpha[group.index]))
    return found


def pfp_counts_for_eps(groups: list[PFPGroup], eps: float, channels: dict[int, int], round_to) -> dict[int, int]:
    return {g.index: round_keep(keep_for_eps(eps, g.probabilities, g.alpha, g.total), channels[g.index], round_to)
            for g in groups}


def pfp_keep_counts(analysis, scores, stats, filters: float | None, target_macs: float | None,
                    round_to: int | None, cost: CostModel | None = None) -> tuple[dict[int, int], dict]:
    """Keep counts for every prunable group and a summary {eps, achieved}: the smallest eps (most
    channels kept) whose counts meet the target. Groups no consumer reads keep all their channels."""
    channels = {g.index: g.channels for g in analysis.prunable_groups()}
    groups = pfp_groups(analysis, scores, stats)
    fixed = {g: c for g, c in channels.items() if g in stats.unread}
    if target_macs is not None:
        cost = cost or CostModel.build(analysis)
        limit = target_macs * cost.full
        measure = lambda counts: cost.macs({**fixed, **counts})  # noqa: E731
    else:
        total = sum(channels.values())
        limit = total - int(np.floor(filters * total + 1e-9))
        measure = lambda counts: sum(fixed.values()) + sum(counts.values())  # noqa: E731
    if measure(channels) <= limit:  # nothing needs to go (e.g. --filters 0): keep every channel
        return dict(channels), {"eps": 0.0, "target": float(limit), "achieved": float(measure(channels)),
                                "unit": "macs" if target_macs is not None else "channels"}
    lo, hi = np.log(EPS_RANGE[0]), np.log(EPS_RANGE[1])
    if measure(pfp_counts_for_eps(groups, float(np.exp(lo)), channels, round_to)) <= limit:
        hi = lo  # even the smallest error keeps within the target
    for _ in range(BISECTION_STEPS):
        if hi - lo < 1e-9:
            break
        mid = (lo + hi) / 2
        if measure(pfp_counts_for_eps(groups, float(np.exp(mid)), channels, round_to)) <= limit:
            hi = mid
        else:
            lo = mid
    eps = float(np.exp(hi))
    counts = {**fixed, **pfp_counts_for_eps(groups, eps, channels, round_to)}
    achieved = measure(counts)
    if achieved > limit:
        log.warning("pfp: the target cannot be met (each group keeps at least one channel)")
    return counts, {"eps": eps, "target": float(limit), "achieved": float(achieved),
                    "unit": "macs" if target_macs is not None else "channels"}


# ---------------------------------------------------------------- other scorers: search the ratio


def ratio_for_macs(analysis, scores, target_macs: float, global_ranking: bool, round_to,
                   cost: CostModel | None = None) -> tuple[dict[int, int], dict]:
    """Keep counts from the smallest --filters ratio whose estimated MACs meet `target_macs`."""
    cost = cost or CostModel.build(analysis)
    limit = target_macs * cost.full
    lo, hi = 0.0, 1.0 - 1e-9
    if cost.macs(keep_counts(analysis, scores, lo, global_ranking, round_to)) <= limit:
        hi = lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if cost.macs(keep_counts(analysis, scores, mid, global_ranking, round_to)) <= limit:
            hi = mid
        else:
            lo = mid
    counts = keep_counts(analysis, scores, hi, global_ranking, round_to)
    return counts, {"filters": hi, "target": float(limit), "achieved": cost.macs(counts), "unit": "macs"}


# ---------------------------------------------------------------- counts and channels for any scorer


def choose_channels(analysis, scorer: str, scores: dict[int, np.ndarray], context, *, filters: float,
                    global_ranking: bool, round_to, target_macs: float | None, pfp_mode: str = "topk",
                    seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict | None]:
    """(kept unit positions per group, per-unit weight scales for PFP's sample mode, budget summary)."""
    summary = None
    if scorer == "pfp" and context.pfp is not None:
        counts, summary = pfp_keep_counts(analysis, scores, context.pfp, filters, target_macs, round_to)
        if global_ranking:
            context.notes.append("pfp: --global changes nothing (PFP's budget spans all groups already)")
    elif target_macs is not None:
        counts, summary = ratio_for_macs(analysis, scores, target_macs, global_ranking, round_to)
    else:
        counts = keep_counts(analysis, scores, filters, global_ranking, round_to)
    keep = select(analysis, scores, counts)
    scales = {}
    if scorer == "pfp" and pfp_mode == "sample" and context.pfp is not None:
        for group in analysis.prunable_groups():
            if group.index in context.pfp.unread or counts[group.index] >= group.channels:
                continue
            kept, factors = sample_channels(scores[group.index], counts[group.index],
                                            np.random.default_rng([seed, group.index]))
            keep[group.index] = kept
            scales[group.index] = np.ones(group.channels)
            scales[group.index][kept] = factors
        keep = ensure_nonempty(analysis, scores, keep)
    return keep, scales, summary
