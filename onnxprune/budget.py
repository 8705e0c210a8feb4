"""Global budgets: per-group keep counts that meet a target number of channels or of MACs.

- A scorer that brings its own allocation (`scoring.Allocation`) meets the `Target` itself: `--filters R`
  (fraction of all prunable channels removed) or `--target-macs F` (fraction of MACs kept). PFP (paper
  Sec. 3.3) bisects one relative error eps for the whole network (scoring/pfp.py).
- Other scorers with `--target-macs F`: the `--filters` ratio (uniform per group, or global) is
  bisected instead.

MACs are estimated from the analysis without rewriting: every Conv/Gemm/MatMul that creates channels
costs (its MACs) x (kept fraction of its input channels) x (kept fraction of its output channels) (a
recurrent layer's recurrent product: x its output fraction twice, `Handler.cost_parts`), every other
computing op its MACs times the kept fraction of the channels it carries. A group keeping k of C
units is taken to keep k/C of the positions its units occupy in each tensor (exact but for Split/Slice).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .allocate import keep_counts, select
from .ops import handler_for
from .validate.cost import node_macs
from .validate.latency_model import MULTIPLES, layer_label

WASTE = 0.01  # --round-to auto: a multiple may waste this share of its layers' time (favoured_multiples)


@dataclass
class CostModel:
    """MACs as a function of per-group keep counts (see the module docstring)."""

    groups: list[int]  # prunable group indices, the columns of `removed_share`
    channels: np.ndarray  # units per group
    removed_share: np.ndarray  # [tensors, groups]: share of a tensor's positions owned by each group
    base: np.ndarray  # MACs of every costed node at full size
    inputs: np.ndarray  # tensor row of the fraction that scales the node's input side (-1: none)
    outputs: np.ndarray  # likewise for the output side
    nodes: list[str]  # the node of each entry of `base`

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
        base, ins, outs, names = [], [], [], []
        for node in analysis.graph.nodes:
            macs = node_macs(OnnxExporter.export_node(node), analysis.shapes, {})
            if not macs:
                continue
            handler = handler_for(node.op, node.domain)
            parts = handler.cost_parts(node) if handler is not None and id(node) in sources else None
            if parts is not None:
                for share, tensor_in, tensor_out in parts:
                    base.append(macs * share)
                    ins.append(row(tensor_in))
                    outs.append(row(tensor_out))
                    names.append(layer_label(node))
                continue
            out_row = row(node.outputs[0]) if node.outputs else -1
            in_row = row(node.inputs[0]) if node.inputs else -1
            if id(node) not in sources:  # channels pass through: scale by the side that carries them
                in_row, out_row = (-1, out_row) if out_row >= 0 else (in_row, -1)
            base.append(macs)
            ins.append(in_row)
            outs.append(out_row)
            names.append(layer_label(node))
        share_matrix = np.array(shares).reshape(len(shares), len(groups))
        channels = np.array([analysis.groups[g].channels for g in groups], dtype=np.float64)
        return cls(groups, channels, share_matrix, np.array(base, dtype=np.float64),
                   np.array(ins, dtype=np.int64), np.array(outs, dtype=np.int64), names)

    @property
    def full(self) -> float:
        return float(self.base.sum())

    def fractions(self, counts: dict[int, int]) -> np.ndarray:
        """Kept fraction of each tracked tensor's positions, then 1 (row -1: no tracked channels)."""
        kept = np.array([counts.get(g, c) for g, c in zip(self.groups, self.channels)], dtype=np.float64)
        fraction = 1.0 - (self.removed_share * (1.0 - kept / self.channels)).sum(1)  # no BLAS: see scoring/pfp.py
        return np.append(fraction, 1.0)

    def macs(self, counts: dict[int, int]) -> float:
        fraction = self.fractions(counts)
        return float((self.base * fraction[self.inputs] * fraction[self.outputs]).sum())


@dataclass
class Target:
    """What an allocation must meet: `measure(counts) <= limit`, counted in `unit` ("channels", "macs" or
    "ms"). `smooth`, when given, is the measure without steps, for the saving of one channel."""

    limit: float
    measure: Callable[[dict[int, int]], float]
    unit: str
    smooth: Callable[[dict[int, int]], float] | None = None


@dataclass
class LatencyPredictor:
    """Predicted whole-model ms of keep counts: the measured ms of the model as it is cut, at full width (the
    original after `ops.rules`' rewrites), each timed layer's fitted time at its kept channels in place of
    its fitted time at full size (validate/latency_model.py). The other ops are taken to cost what they
    cost at full width."""

    cost: CostModel
    fits: list  # validate.latency_model.LayerFit, one per timed layer
    entries: np.ndarray  # the CostModel entry of each fit
    start_ms: float  # the full-width model's measured ms
    full_ms: list = field(init=False)  # each fit's time at full size
    smooth_fits: list = field(init=False)  # each fit without its steps (multiple 1)

    def __post_init__(self):  # once, not at every measure of the allocation's search
        self.full_ms = [fit.predict(fit.c_in, fit.c_out) for fit in self.fits]
        self.smooth_fits = [replace(fit, multiple=1) for fit in self.fits]

    @classmethod
    def build(cls, cost: CostModel, fits: list, start_ms: float) -> "LatencyPredictor":
        entry = {name: i for i, name in reversed(list(enumerate(cost.nodes)))}
        fits = [f for f in fits if f.name in entry]
        return cls(cost, fits, np.array([entry[f.name] for f in fits], dtype=np.int64), start_ms)

    def kept_fractions(self, counts: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Per fit, the kept fraction of its input and of its output channels."""
        fraction = self.cost.fractions(counts)
        return fraction[self.cost.inputs[self.entries]], fraction[self.cost.outputs[self.entries]]

    def ms(self, counts: dict[int, int], stepped: bool = True) -> float:
        f_in, f_out = self.kept_fractions(counts)
        total = self.start_ms
        used = self.fits if stepped else self.smooth_fits
        for fit, timed, full, a, b in zip(self.fits, used, self.full_ms, f_in, f_out):
            total += float(timed.predict(a * fit.c_in, b * fit.c_out) - full)
        return total

    def layers(self, counts: dict[int, int], top: int = 10) -> list[dict]:
        """The `top` timed layers by predicted saving: kept channels and predicted ms, full and kept."""
        f_in, f_out = self.kept_fractions(counts)
        rows = [{"name": fit.name, "channels_in": [round(a * fit.c_in), fit.c_in],
                 "channels_out": [round(b * fit.c_out), fit.c_out], "full_ms": float(full),
                 "predicted_ms": float(fit.predict(a * fit.c_in, b * fit.c_out))}
                for fit, full, a, b in zip(self.fits, self.full_ms, f_in, f_out)]
        return sorted(rows, key=lambda r: r["predicted_ms"] - r["full_ms"])[:top]

    def target(self, limit_ms: float) -> Target:
        return Target(limit_ms, self.ms, "ms", lambda counts: self.ms(counts, stepped=False))

    def favoured_multiples(self) -> dict[int, int]:
        """--round-to auto: per group that a timed layer reads or writes, the smallest multiple of
        `MULTIPLES` at whose keep counts the fitted steps charge for channels not kept (the mean over those
        counts) at most `WASTE` of the group's layers' time at full size more than the least wasteful
        multiple does: a layer stepping at 16 makes 8 wasteful, and at 4 makes 8 as exact as 4. Never below
        the block of a layer onnxruntime runs in its blocked layout (`LayerFit.block`): cut off it, a layer
        costs the whole model more than its time alone shows. Groups no timed layer sees are absent (the
        default rounding)."""
        shares = np.vstack([self.cost.removed_share, np.zeros(len(self.cost.groups))])  # row -1: no channels
        share_in = shares[self.cost.inputs[self.entries]]
        share_out = shares[self.cost.outputs[self.entries]]
        multiples = {}
        for column, (group, channels) in enumerate(zip(self.cost.groups, self.cost.channels.astype(int))):
            touching = np.flatnonzero((share_in[:, column] > 0) | (share_out[:, column] > 0))
            if not len(touching):
                continue
            removed = 1.0 - np.arange(1, channels + 1) / channels
            waste, full = np.zeros(channels), 0.0
            for i in touching:
                fit, smooth = self.fits[i], self.smooth_fits[i]
                k_in = (1.0 - share_in[i, column] * removed) * fit.c_in
                k_out = (1.0 - share_out[i, column] * removed) * fit.c_out
                waste += fit.predict(k_in, k_out) - smooth.predict(k_in, k_out)
                full += self.full_ms[i]
            counts = np.arange(1, channels + 1)
            block = max((self.fits[i].block for i in touching if self.fits[i].block <= channels), default=1)
            candidates = [m for m in MULTIPLES if block <= m <= channels]
            mean_waste = [waste[(counts % m == 0) | (counts == channels)].mean() for m in candidates]
            least = min(mean_waste)
            multiples[group] = next(m for m, w in zip(candidates, mean_waste) if w <= least + WASTE * full)
        return multiples


def budget_target(analysis, filters: float | None, target_macs: float | None, cost: CostModel | None = None) -> Target:
    """Fraction `target_macs` of the MACs kept when given, else fraction `filters` of all prunable channels
    removed."""
    if target_macs is not None:
        cost = cost or CostModel.build(analysis)
        return Target(target_macs * cost.full, cost.macs, "macs")
    total = sum(g.channels for g in analysis.prunable_groups())
    return Target(total - int(np.floor(filters * total + 1e-9)), lambda counts: sum(counts.values()), "channels")


# ---------------------------------------------------------------- other scorers: search the ratio


def ratio_for_macs(analysis, scores, target_macs: float, global_ranking: bool, round_to,
                   cost: CostModel | None = None) -> tuple[dict[int, int], dict]:
    """Keep counts from the smallest --filters ratio whose estimated MACs meet `target_macs`."""
    cost = cost or CostModel.build(analysis)
    return ratio_for_target(analysis, scores, Target(target_macs * cost.full, cost.macs, "macs"), global_ranking,
                            round_to)


def ratio_for_target(analysis, scores, target: Target, global_ranking: bool, round_to) -> tuple[dict[int, int], dict]:
    """Keep counts from the smallest --filters ratio whose measure meets `target`."""
    lo, hi = 0.0, 1.0 - 1e-9
    if target.measure(keep_counts(analysis, scores, lo, global_ranking, round_to)) <= target.limit:
        hi = lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if target.measure(keep_counts(analysis, scores, mid, global_ranking, round_to)) <= target.limit:
            hi = mid
        else:
            lo = mid
    counts = keep_counts(analysis, scores, hi, global_ranking, round_to)
    return counts, {"filters": hi, "target": float(target.limit), "achieved": target.measure(counts),
                    "unit": target.unit}


def short_of(summary: dict | None) -> bool:
    """Whether an allocation's budget summary fell short of its target (every group at its floor)."""
    return summary is not None and summary["achieved"] > summary["target"] * (1 + 1e-9)


# ---------------------------------------------------------------- counts and channels for any scorer


def choose_channels(analysis, scores: dict[int, np.ndarray], context, *, filters: float, global_ranking: bool,
                    round_to, target_macs: float | None, pfp_mode: str = "topk", seed: int = 0,
                    counts: dict[int, int] | None = None, target: Target | None = None
                    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict | None]:
    """(kept unit positions per group, per-unit weight scales, budget summary). A scorer that brings its
    own allocation (`context.allocation`) meets the target itself; otherwise the --filters ratio does.
    `counts`: keep counts decided already (a step of --steps); the scores only choose which units.
    `target`: a target given whole (a latency budget) instead of `filters` or `target_macs`."""
    allocation = context.allocation
    summary = None
    if counts is None:
        counts, summary = _keep_counts(analysis, scores, context, filters, global_ranking, round_to, target_macs,
                                       target)
    keep = select(analysis, scores, counts)
    if allocation is not None:
        return (*allocation.select(analysis, scores, counts, keep, pfp_mode, seed), summary)
    return keep, {}, summary


def _keep_counts(analysis, scores, context, filters, global_ranking, round_to, target_macs, target=None):
    """(keep count per group, budget summary or None) for the target."""
    allocation = context.allocation
    if allocation is not None:
        target = target or budget_target(analysis, filters, target_macs)
        counts, summary = allocation.keep_counts(analysis, scores, target, round_to)
        if global_ranking:
            context.notes.append(allocation.global_note)
        return counts, summary
    if target is not None:
        return ratio_for_target(analysis, scores, target, global_ranking, round_to)
    if target_macs is not None:
        return ratio_for_macs(analysis, scores, target_macs, global_ranking, round_to)
    return keep_counts(analysis, scores, filters, global_ranking, round_to), None
