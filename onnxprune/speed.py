"""Latency as the budget: the latency model of this run (validate/latency_model.py, `budget.LatencyPredictor`),
the `--target-latency` / `--target-speedup` rounds, and the report's predicted figures.

The original is timed once when the model is built (`LatencyConfig` runs, median; at one thread in CPU
time, `validate.latency.model_clock`, like the layers): a speed-up target is that figure over X, a
`--target-latency` is brought to that clock by the original's wall time. Each round allocates to a
predicted-ms limit (`budget.LatencyPredictor.target`), cuts the channels, and measures the cut model
against the original, interleaved; on a miss the saving still needed is scaled by the round's measured
saving over its predicted one (`LatencyBudget.retargeted`, at most `GROWTH` times the round's predicted
saving) and the next round aims at that, at most `ROUNDS` times. A round within `TOLERANCE` (5%) of the goal meets it; one faster by more likewise aims at
a larger allocation. The result is the slowest round that met the goal (else the last). When even every
group at its floor is predicted slower than the limit, that smallest allocation is cut and measured: the
prediction of a loaded machine's savings can be far off (short layer runs escape the contention that
slows a whole model), and the rounds scale it by what was measured; only when the measured floor misses
the goal too is the target out of reach (`TargetOutOfReach`, exit 1, naming the measured speed-up).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .allocate import DEFAULT_ROUND_TO
from .baseline import Baseline
from .budget import CostModel, LatencyPredictor, Target, short_of
from .config import PruneConfig, latency_wanted
from .errors import ValidationFailed
from .ops import handler_for
from .stages import analyze_model, choose, rewrite_channels
from .validate.latency import LatencyConfig, compare_latency, latency_session, model_clock, summarize, time_runs
from .validate.latency_model import LatencyCache, cache_key, channel_block, layer_fits, timed_layers

ROUNDS = 5  # a few: each is an allocation, a cut and a timing (no recovery), seconds on small models
TOLERANCE = 0.05  # a round within this share of the goal meets it; one faster by more tries a larger allocation
GROWTH = 2.0  # a round after a miss predicts at most this many times the missed round's saving


class TargetOutOfReach(ValidationFailed):
    """The latency model predicts the target slower than the smallest allocation allows (exit 1)."""


def met(measured_ms: float, target_ms: float) -> bool:
    """Whether a measured time meets the goal, within `TOLERANCE`."""
    return measured_ms <= target_ms * (1 + TOLERANCE)


@dataclass
class LatencyBudget:
    predictor: LatencyPredictor
    timing: LatencyConfig
    original_ms: float  # measured when the model was built
    target_ms: float | None  # None: the model only predicts (--predict-latency)
    asked: str  # the option as given, for messages
    cached: bool
    limit_ms: float = 0.0  # the predicted ms the next allocation aims at
    rounds: list[dict] = field(default_factory=list)
    chosen: int = -1  # the round whose allocation is the result
    save: Callable[[], None] = lambda: None  # writes new layer fits to the cache (when the run succeeds)
    multiples: dict[int, int] | None = None  # --round-to auto, or a target's default: each group's multiple
    round_to_by: str = "auto"  # what chose `multiples`: "auto" (the fits) or "block" (`round_to_block`)

    def round_to_auto(self) -> dict[int, int]:
        """--round-to auto's multiple per group (`LatencyPredictor.favoured_multiples`)."""
        self.multiples = self.predictor.favoured_multiples()
        return self.multiples

    def round_to_block(self, analysis) -> dict[int, int]:
        """A latency target's multiple without --round-to: onnxruntime's channel block on this machine
        (`channel_block`; 16 with AVX-512), when above the default 8, for every group of a Conv that can be
        cut at it (a Conv cut to a count between multiples of the block computes the padded channels all the
        same: at half the MACs the three CNNs of bench/eval_latency.py ran 4-7% faster at 16 than at 8 on an
        AVX-512 CPU); the default elsewhere (matrix products were not measured)."""
        block = channel_block()
        multiples = {g.index: block for g in analysis.prunable_groups()
                     if block > DEFAULT_ROUND_TO and block // math.gcd(block, g.width) < g.channels
                     and any(handler_for(s.node.op, s.node.domain).channel_padded(s.node) for s in g.sources)}
        if multiples:
            self.multiples, self.round_to_by = multiples, "block"
        return multiples

    def target(self) -> Target | None:
        return None if self.target_ms is None else self.predictor.target(self.limit_ms)

    def goal(self, original_ms: float) -> float:
        """The goal in ms of a timing whose original measured `original_ms`: a speed-up target's is over it."""
        if self.asked.startswith("--target-latency"):
            return self.target_ms
        return original_ms * self.target_ms / self.original_ms

    def refuse(self) -> None:
        """Refuse a target that the smallest allocation (every group at its floor), just measured, missed."""
        last = self.rounds[-1]
        before, after = last["original_ms"], last["measured_ms"]
        raise TargetOutOfReach(
            f"{self.asked} is out of reach: the smallest allocation measured {after:.3f} ms (predicted "
            f"{last['predicted_ms']:.3f} ms), a {before / after:.2f}x speed-up over the original's {before:.3f} ms "
            f"measured beside it; ask for at least {after * self.original_ms / before:.3f} ms or at most a "
            f"{before / after:.2f}x speed-up")

    def measure_round(self, baseline: Baseline, pruned, counts: dict[int, int]) -> tuple[bool, bool]:
        """Time the cut model against the original; record the round; on a miss, tighten the limit.
        (met: no slower than the goal within `TOLERANCE`, close: no faster than it by more)."""
        measured = compare_latency(baseline.session(self.timing.threads), pruned, baseline.single_batch(),
                                   self.timing)
        before, after = measured["before"]["median_ms"], measured["after"]["median_ms"]
        goal = self.goal(before)
        predicted = self.predictor.ms(counts)
        self.rounds.append({"limit_ms": self.limit_ms, "predicted_ms": predicted,
                            "measured_ms": after, "original_ms": before, "speedup": before / after,
                            "target_ms": goal})
        reached, close = met(after, goal), after >= goal * (1 - TOLERANCE)
        if not (reached and close):
            self.limit_ms = self.retargeted(predicted, before, after, goal)
        return reached, close

    def retargeted(self, predicted: float, before: float, after: float, goal: float) -> float:
        """The next predicted-ms limit: the saving measured was `ratio` times the saving predicted, so the
        saving the goal needs is predicted at 1 / ratio of it (else, when nothing was saved, the prediction
        scaled by goal / measured); below this round's prediction after a miss, but predicting at most
        `GROWTH` times its saving (a round that measured a small share of its predicted saving would else
        send the next to every group's floor, far past the goal); when too fast, above this round's limit by
        at least the measured excess (the allocation may have stopped well short of it). Once one round was
        too fast and a slower-predicted one too slow, the limit is interpolated between them."""
        bracket = self.bracket()
        if bracket is not None:
            return bracket
        ratio = (before - after) / (self.original_ms - predicted) if predicted < self.original_ms else 0.0
        limit = self.original_ms - (before - goal) / ratio if ratio > 0 else predicted * goal / after
        if after > goal:
            if predicted < self.original_ms:  # a saving was predicted: aim at most GROWTH times it
                limit = max(limit, self.original_ms - GROWTH * (self.original_ms - predicted))
            return min(limit, predicted * (1 - 1e-6))
        return max(limit, self.limit_ms + (goal - after) * self.original_ms / before)

    def bracket(self) -> float | None:
        """The predicted ms at which measured / goal reaches 1, linear between the too-fast round predicted
        slowest and the too-slow round predicted fastest, when the first is predicted faster than the second
        (predicted, not aimed at: a round at every group's floor predicts more than its limit)."""
        fast = [r for r in self.rounds if r["measured_ms"] < r["target_ms"]]
        slow = [r for r in self.rounds if r["measured_ms"] > r["target_ms"]]
        if not fast or not slow:
            return None
        a, b = max(fast, key=lambda r: r["predicted_ms"]), min(slow, key=lambda r: r["predicted_ms"])
        if a["predicted_ms"] >= b["predicted_ms"]:
            return None
        ra, rb = a["measured_ms"] / a["target_ms"], b["measured_ms"] / b["target_ms"]
        return a["predicted_ms"] + (1 - ra) / (rb - ra) * (b["predicted_ms"] - a["predicted_ms"])

    def section(self, counts: dict[int, int], measured: dict | None) -> dict:
        """The report's predicted figures beside the measured ones of `measured` (compare_latency's)."""
        predicted = self.predictor.ms(counts)
        fits = self.predictor.fits
        out = {"predicted_ms": predicted, "model_original_ms": self.original_ms,
               "model_simplified_ms": self.predictor.start_ms,
               "predicted_speedup": self.original_ms / predicted,
               "macs_kept": self.predictor.cost.macs(counts) / self.predictor.cost.full,
               "layers": self.predictor.layers(counts),
               "model": {"layers": len(fits), "cached": self.cached,
                         "multiples": {str(m): n for m, n in sorted(Counter(f.multiple for f in fits).items())}}}
        if self.multiples is not None:
            chosen = Counter(self.multiples.values())
            out["round_to"] = {str(m): n for m, n in sorted(chosen.items())}
            out["round_to_by"] = self.round_to_by
        if measured is not None:  # as shares of the original: the model's clock may not be the wall's
            before, after = measured["before"]["median_ms"], measured["after"]["median_ms"]
            out["prediction_error"] = (predicted / self.original_ms) / (after / before) - 1.0
        if self.target_ms is not None:
            chosen = self.rounds[self.chosen]
            out.update({"target_ms": chosen["target_ms"], "asked": self.asked, "rounds": self.rounds,
                        "chosen_round": self.chosen, "met": met(chosen["measured_ms"], chosen["target_ms"])})
            if measured is not None:  # the final timing: on a noisy machine it may disagree with the round's
                out["met_in_final_timing"] = met(measured["after"]["median_ms"], self.goal(measured["before"]["median_ms"]))
        return out


def latency_budget(baseline: Baseline, analysis, config: PruneConfig) -> LatencyBudget | None:
    """The latency model of this run (None when no option asks for it): the original timed, each layer's
    fit measured or read from `config.latency_cache`."""
    if not latency_wanted(config):
        return None
    timing = config.latency or LatencyConfig()
    sessions = {"original": baseline.session(timing.threads)}
    loaded = baseline.loaded
    if loaded.simplified:  # predictions start from the model as the rules rewrote it, timed beside the original
        sessions["simplified"] = latency_session(loaded.model if loaded.model is not None else loaded.file.load(),
                                                 timing.threads)
    seconds = time_runs(sessions, baseline.single_batch(), timing, model_clock(timing.threads))
    original_ms = summarize(seconds["original"])["median_ms"]
    start_ms = summarize(seconds.get("simplified", seconds["original"]))["median_ms"]
    layers, cache = timed_layers(analysis), LatencyCache(config.latency_cache)
    fits, cached = layer_fits(layers, timing.threads, cache, write=False)
    predictor = LatencyPredictor.build(CostModel.build(analysis), fits, start_ms)
    limit = None  # the first allocation's predicted ms
    if config.target_latency is not None:  # wall ms: to the model's clock by the original's two times
        target, asked = config.target_latency, f"--target-latency {config.target_latency:g} ms"
        wall = time_runs({"original": baseline.session(timing.threads)}, baseline.single_batch(), timing)["original"]
        limit = target * original_ms / summarize(wall)["median_ms"]
    elif config.target_speedup is not None:
        target, asked = original_ms / config.target_speedup, f"--target-speedup {config.target_speedup:g}"
    else:
        target, asked = None, "--predict-latency"
    budget = LatencyBudget(predictor, timing, original_ms, target, asked, cached, limit or target or 0.0)
    if not cached:
        budget.save = lambda: cache.put(cache_key(layers, timing.threads), fits)
    return budget


def counts_of(keep: dict[int, np.ndarray]) -> dict[int, int]:
    return {g: len(k) for g, k in keep.items()}


def latency_rounds(baseline: Baseline, analysis, config: PruneConfig, budget: LatencyBudget, factorizing: bool):
    """(the channel choice for a latency target, its cut model and masks as `rewrite_channels` gives them):
    allocate to the predicted limit, cut, measure; on a miss tighten and try again (`ROUNDS` at most, until an
    allocation repeats an earlier round's). Out
    of reach (the first round's allocation, at every group's floor, measured slower than the goal):
    `TargetOutOfReach`."""
    best = None  # (measured ms, round, choice, (cut, masks)) of the slowest round that met the goal
    seen, last = [], None  # the keep counts of every round; the last round's (choice, (cut, masks))
    for index in range(ROUNDS):
        choice = choose(baseline, analysis, config, factorizing, target=budget.target())
        counts = counts_of(choice.keep)
        if counts in seen:  # the allocation cannot get closer: stop
            break
        seen.append(counts)
        at_floor = short_of(choice.budget)
        rewritten = rewrite_channels(analyze_model(baseline.loaded, config.exclude, config.hidden), choice,
                                     baseline.loaded.model.ir_version)
        reached, close = budget.measure_round(baseline, rewritten[0], counts)
        last = (choice, rewritten)
        if at_floor and not reached and index == 0:  # measured, not only predicted, out of reach
            budget.refuse()
        if reached and (best is None or budget.rounds[-1]["measured_ms"] > best[0]):
            best = (budget.rounds[-1]["measured_ms"], index, choice, rewritten)
        if (reached and close) or (at_floor and not reached):
            break
    if best is None:
        budget.chosen = len(budget.rounds) - 1
        return last
    budget.chosen = best[1]
    return best[2], best[3]
