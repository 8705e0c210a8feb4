"""The obs scorer: structured OBS removal costs and updates against brute-force least squares, the greedy
error curve, the error-per-MAC allocation, and the scorer end to end."""

import numpy as np
import pytest

from onnxprune import PruneConfig, prune
from onnxprune.budget import CostModel, budget_target
from onnxprune.loading import load
from onnxprune.scoring.obs import MIN_KEEP_FRACTION, ObsStats, Problem, damped_inverse, greedy_removal
from onnxprune.stages import analyze_model
from tests import models


def _problem(seed=0, outputs=5, channels=6, kernel=3, rows=400):
    """A layer reading `channels` units of `kernel` features each, plus the bias column."""
    rng = np.random.default_rng(seed)
    features = channels * kernel
    x = rng.standard_normal((rows, features)) @ rng.standard_normal((features, features)) * 0.5  # correlated
    x = np.concatenate([x, np.ones((rows, 1))], axis=1)
    gram = x.T @ x / rows
    weight = rng.standard_normal((outputs, features + 1))
    hinv = damped_inverse(gram)
    damped = np.linalg.inv(hinv)
    columns = {u: np.arange(u * kernel, (u + 1) * kernel) for u in range(channels)}
    energy = float(np.einsum("of,fg,og->", weight, gram, weight))
    return Problem(weight, hinv, columns, energy), damped


def _brute_force(weight, damped, removed_columns):
    """min over W' (zero on the removed columns) of tr((W - W') H (W - W')^T), and that W'."""
    chol = np.linalg.cholesky(damped)  # H = L L^T: the error is ||(W - W') L||^2
    target = weight @ chol
    keep = np.setdiff1d(np.arange(weight.shape[1]), removed_columns)
    fitted = np.zeros_like(weight)
    fitted[:, keep] = target @ np.linalg.pinv(chol[keep, :])
    return float(np.sum((target - fitted @ chol) ** 2)), fitted


def test_unit_cost_is_the_error_left_after_the_best_refit():
    problem, damped = _problem()
    costs = problem.unit_costs(np.arange(6))
    for unit in range(6):
        error, _ = _brute_force(problem.weight, damped, problem.columns[unit])
        assert costs[unit] * problem.energy == pytest.approx(error, rel=1e-6)


def test_removal_updates_the_rest_to_the_least_squares_fit():
    problem, damped = _problem(seed=1)
    original = problem.weight.copy()
    removed = np.concatenate([problem.columns[1], problem.columns[4]])
    expected_error, expected_weight = _brute_force(original, damped, removed)
    work = problem.copy()
    cost = work.remove(np.array([1, 4]))
    assert cost * problem.energy == pytest.approx(expected_error, rel=1e-6)
    np.testing.assert_allclose(work.weight, expected_weight, atol=1e-8)


def test_sequential_removals_add_up_to_the_joint_cost():
    problem, damped = _problem(seed=2)
    work = problem.copy()
    total = work.remove(np.array([0])) + work.remove(np.array([3, 5]))
    error, _ = _brute_force(problem.weight, damped, np.concatenate([problem.columns[u] for u in (0, 3, 5)]))
    assert total * problem.energy == pytest.approx(error, rel=1e-6)
    # later costs are measured on the updated layer: what removing unit 2 now leaves
    after, _ = _brute_force(problem.weight, damped, np.concatenate([problem.columns[u] for u in (0, 2, 3, 5)]))
    assert work.unit_costs(np.array([2]))[0] * problem.energy == pytest.approx(after - error, rel=1e-5)


def test_the_inverse_after_removals_is_the_damped_inverse_over_the_features_left():
    """`remove` defers its H^-1 updates (`lowrank`) until `drop` compacts the arrays: before and after that,
    H^-1 is the inverse of the damped Gram matrix over the features left (OBC eq. 6), zero on the removed."""
    problem, damped = _problem(seed=3, channels=8)  # 25 features: a third unit's three trigger the compaction
    work = problem.copy()
    removed = []
    for unit in (2, 5):
        work.drop(np.array([unit]))
        removed.extend(problem.columns[unit])
        assert work.lowrank is not None and work.index is None  # deferred, not yet compacted
        current = work.hinv - work.lowrank @ work.lowrank.T
        kept = np.setdiff1d(np.arange(25), removed)
        np.testing.assert_allclose(current[np.ix_(kept, kept)], np.linalg.inv(damped[np.ix_(kept, kept)]), atol=1e-8)
        np.testing.assert_allclose(current[removed], 0.0, atol=1e-8)
    work.drop(np.array([7]))
    kept = np.setdiff1d(np.arange(25), [*removed, *problem.columns[7]])
    assert work.lowrank is None
    np.testing.assert_array_equal(work.index, kept)
    np.testing.assert_allclose(work.hinv, np.linalg.inv(damped[np.ix_(kept, kept)]), atol=1e-8)


def test_a_copy_in_the_middle_of_removals_carries_the_pending_updates():
    problem, _ = _problem(seed=3, channels=8)
    work = problem.copy()
    work.drop(np.array([2]))  # deferred, not yet compacted
    assert work.lowrank is not None
    twin = work.copy()
    for p in (work, twin):
        p.drop(np.array([5]))
    np.testing.assert_allclose(twin.weight, work.weight, atol=1e-10)
    assert twin.unit_costs(np.array([0, 7])) == pytest.approx(work.unit_costs(np.array([0, 7])), rel=1e-10)


def test_greedy_curve_is_exact_at_batch_ends_and_leaves_the_problems_unchanged():
    problem, damped = _problem(seed=3, channels=8)
    before = problem.weight.copy()
    order, curve = greedy_removal([problem], 8, steps=3)
    np.testing.assert_array_equal(problem.weight, before)
    assert len(set(order.tolist())) == len(order) == 7
    assert np.all(np.diff(curve) >= -1e-12)
    for r in (3, 6, 7):  # batches of 3: exact at 3, 6 and at the end
        error, _ = _brute_force(problem.weight, damped, np.concatenate([problem.columns[u] for u in order[:r]]))
        assert curve[r] * problem.energy == pytest.approx(error, rel=1e-6)


def test_greedy_sums_the_costs_of_every_consumer():
    """A unit cheap for one consumer but expensive for another is not removed first."""
    first, _ = _problem(seed=4, channels=4)
    second, _ = _problem(seed=5, channels=4)
    first.weight[:, first.columns[0]] *= 1e-3  # unit 0 is free in the first layer
    order_alone, _ = greedy_removal([first], 4, steps=3)
    assert order_alone[0] == 0
    second.weight[:, second.columns[0]] *= 1e3  # and costly in the second
    order_both, _ = greedy_removal([first, second], 4, steps=3)
    assert set(range(4)) - set(order_both.tolist()) == {0}  # the one unit never removed


@pytest.mark.parametrize("kept_macs, deepest", [(0.3, 0.25), (0.05, 0.1)])
def test_groups_keep_a_quarter_unless_the_target_needs_more(kept_macs, deepest):
    """One group is cheap to cut (its curve flat): at 30% of the MACs it stops at a quarter of its channels;
    at 5%, which a quarter of every group cannot meet, it and others go below it, down to the 10% floor."""
    b = models.Builder(seed=0)
    x = "x"
    for i in range(3):
        x = b.relu(f"act{i}", b.conv(f"conv{i}", x, 3 if i == 0 else 20, 20))
    b.output(b.conv("head", x, 20, 4))
    analysis = analyze_model(load(b.model([("x", [1, 3, 16, 16])])))
    groups = analysis.prunable_groups()
    assert len(groups) == 3
    stats = ObsStats()
    for i, g in enumerate(groups):
        stats.curves[g.index] = np.linspace(0, 1, g.channels) ** 2 * (1e-3 if i == 0 else 1.0)
    counts, summary = stats.keep_counts(analysis, {}, budget_target(analysis, None, kept_macs), round_to=1)
    assert summary["achieved"] <= summary["target"]
    shares = [counts[g.index] / g.channels for g in groups]
    assert min(shares) >= deepest - 1e-9
    assert min(shares) < 0.25 or deepest == 0.25
    assert counts[groups[0].index] == int(np.ceil(deepest * groups[0].channels))  # the cheap group at the floor


def test_curve_allocation_meets_the_budget_where_error_per_mac_is_lowest():
    model = models.conv_chain()
    analysis = analyze_model(load(model))
    groups = analysis.prunable_groups()
    stats = ObsStats()
    for i, g in enumerate(groups):  # the first group's error rises 100x faster than the others'
        stats.curves[g.index] = np.linspace(0, 1, g.channels) ** 2 * (100.0 if i == 0 else 1.0)
    counts, summary = stats.keep_counts(analysis, {}, budget_target(analysis, None, 0.6), round_to=1)
    assert summary["achieved"] <= summary["target"]
    fractions = {g.index: counts[g.index] / g.channels for g in groups}
    assert fractions[groups[0].index] == max(fractions.values())
    for g in groups:
        assert counts[g.index] >= np.ceil(MIN_KEEP_FRACTION * g.channels)
    # within one channel per group: one more channel in any group would break the budget (or it is whole)
    cost = CostModel.build(analysis)
    assert all(cost.macs({**counts, g.index: counts[g.index] + 1}) > summary["target"]
               for g in groups if counts[g.index] < g.channels)


def test_curve_allocation_with_round_to_keeps_multiples():
    analysis = analyze_model(load(models.conv_chain()))
    groups = analysis.prunable_groups()
    stats = ObsStats(curves={g.index: np.linspace(0, 1, g.channels) for g in groups})
    counts, _ = stats.keep_counts(analysis, {}, budget_target(analysis, 0.5, None), round_to=2)
    for g in groups:
        assert counts[g.index] % 2 == 0 or counts[g.index] == g.channels


def _calib(model, samples=24, seed=0):
    feed = models.random_input(model, seed)
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((samples, *v.shape[1:])).astype(v.dtype) for k, v in feed.items()}


@pytest.mark.parametrize("build", [models.conv_chain, models.residual, models.concat, models.grouped, models.mlp])
def test_obs_prunes_to_the_macs_target_deterministically(build):
    model = build()
    config = PruneConfig(scorer="obs", target_macs=0.6, calibration=_calib(model), round_to=1)
    first, second = prune(model, config), prune(model, config)
    assert first.plan.to_json() == second.plan.to_json()
    assert first.report["after"]["macs"] <= 0.6 * first.report["before"]["macs"] * 1.02
    assert first.report["scoring"]["budget"]["unit"] == "macs"


def test_the_curve_is_measured_on_held_out_rows():
    """A layer whose calibration inputs are nearly collinear looks free to prune on them; the curve reports
    the error the removals leave on rows it was not chosen on."""
    problem, damped = _problem(seed=6, channels=6)
    rng = np.random.default_rng(7)
    other = np.concatenate([rng.standard_normal((300, 18)), np.ones((300, 1))], axis=1)
    held = other.T @ other / 300
    problem.held = other.T / np.sqrt(300)  # a factor of it: the rows themselves
    order, curve = greedy_removal([problem], 6, steps=5)
    held_energy = float(np.einsum("of,fg,og->", problem.weight, held, problem.weight))
    expected = []
    for r in range(1, 6):  # batches of one: every point is a batch end
        _, fitted = _brute_force(problem.weight, damped, np.concatenate([problem.columns[u] for u in order[:r]]))
        change = problem.weight - fitted
        expected.append(float(np.einsum("of,fg,og->", change, held, change)) / held_energy)
    np.testing.assert_allclose(curve[1:], np.maximum.accumulate(expected), rtol=1e-6)


def test_given_counts_skip_the_curves_and_keep_the_ranking():
    """A step of --steps has its counts already: obs ranks the units as it would, and measures nothing."""
    from onnxprune.calib import CalibrationSet
    from onnxprune.scoring import ScoringContext, score

    model = models.conv_chain()
    analysis = analyze_model(load(model))
    calibration = CalibrationSet(_calib(model, samples=40))
    contexts = [ScoringContext(calibration=calibration, model=model, fixed_batch=1, allocating=a) for a in (True, False)]
    ranked, given = (score(analysis, "obs", c) for c in contexts)
    assert all(np.array_equal(ranked[g], given[g]) for g in ranked)
    assert contexts[0].allocation.curves and not contexts[1].allocation.curves
    assert contexts[0].allocation.sensitivity_samples > 0 == contexts[1].allocation.sensitivity_samples


def test_float32_inverse_agrees_with_float64():
    """H^-1 from the float64 Cholesky factor with float32 products (what the greedy removal works on) is
    within float32's precision of the float64 inverse, on a correlated Gram matrix wider than one halving leaf."""
    from onnxprune.scoring.obs import damped

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2000, 300)) @ rng.standard_normal((300, 300)) + 3.0  # correlated, non-zero mean
    gram = x.T @ x / len(x)
    exact = np.linalg.inv(damped(gram))
    assert damped_inverse(gram, np.float32).dtype == np.float32
    np.testing.assert_allclose(damped_inverse(gram), exact, atol=1e-10 * np.abs(exact).max())
    np.testing.assert_allclose(damped_inverse(gram, np.float32), exact, atol=1e-4 * np.abs(exact).max())


def test_inverse_from_fewer_rows_than_features_is_the_damped_inverse_of_their_gram_matrix():
    """Woodbury's identity on 150 rows of 301 features (a deep layer's few positions): the float64 result is
    the inverse of the damped Gram matrix; in float32 the greedy removal on it keeps the exact order and curve."""
    from onnxprune.scoring.obs import damped, damped_inverse_of_rows

    rng = np.random.default_rng(12)
    x = np.maximum(rng.standard_normal((150, 40)) @ rng.standard_normal((40, 300)) + 1.0, 0.0)  # post-ReLU-like
    x = np.concatenate([x, np.ones((150, 1))], axis=1)
    exact = np.linalg.inv(damped(x.T @ x / len(x)))
    np.testing.assert_allclose(damped_inverse_of_rows(x), exact, atol=1e-9 * np.abs(exact).max())
    single = damped_inverse_of_rows(x.astype(np.float32), np.float32)
    assert single.dtype == np.float32
    weight = rng.standard_normal((8, 301))
    columns = {u: np.arange(3 * u, 3 * u + 3) for u in range(100)}
    energy = float(np.sum((x @ weight.T) ** 2)) / len(x)
    order, curve = greedy_removal([Problem(weight, exact, columns, energy)], 100)
    order32, curve32 = greedy_removal([Problem(weight.astype(np.float32), single, columns, energy)], 100)
    np.testing.assert_array_equal(order32[:50], order[:50])
    np.testing.assert_allclose(curve32, curve, rtol=1e-3, atol=1e-9)


def test_float32_greedy_removes_the_same_units_as_float64():
    problem, _ = _problem(seed=8, outputs=6, channels=10, kernel=3)
    for u in range(10):  # well-separated costs: unit u's weights scaled by u + 1
        problem.weight[:, problem.columns[u]] *= u + 1
    single = Problem(problem.weight, problem.hinv.astype(np.float32), problem.columns, problem.energy)
    order, curve = greedy_removal([problem], 10, steps=4)
    order32, curve32 = greedy_removal([single], 10, steps=4)
    np.testing.assert_array_equal(order32, order)
    np.testing.assert_allclose(curve32, curve, rtol=1e-3, atol=1e-9)


def test_gram_rows_folded_in_any_number_of_products_give_the_same_matrices(monkeypatch):
    """GramFold waits for rows and adds them in one product per max(FOLD_ELEMENTS, F^2 / 2) values: the Gram
    matrices its problems read do not depend on how many products that took (FOLD_ELEMENTS = 1: a product per
    batch, each batch bringing more than F / 2 rows here)."""
    from onnxprune.scoring import obs
    from onnxprune.scoring.consumers import find_consumers

    model = models.conv_chain()
    analysis = analyze_model(load(model))
    consumer = find_consumers(analysis)[0]
    rng = np.random.default_rng(3)
    shape = [d if isinstance(d, int) else 2 for d in analysis.shapes[consumer.tensor]]
    batches = [rng.standard_normal([2, *shape[1:]]).astype(np.float32) for _ in range(5)]
    folds = []
    for limit in (10**12, 1):  # one product when the problems are built; one per batch
        monkeypatch.setattr(obs, "FOLD_ELEMENTS", limit)
        fold = obs.GramFold(consumer, 10, 5, np.random.default_rng(0))
        for i, activation in enumerate(batches):
            fold.add(activation, 2 * i, 2)
        assert bool(fold.waiting[0]) == (limit > 1)
        fold.problems(analysis)
        folds.append(fold)
    assert folds[0].count == folds[1].count > 0 and folds[0].held_count == folds[1].held_count
    for name in ("gram", "held"):
        np.testing.assert_allclose(getattr(folds[1], name), getattr(folds[0], name), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("build, kept", [(models.conv_chain, True), (models.grouped, False)])
def test_fewer_rows_than_a_blocks_features_are_kept_and_give_the_problems_of_their_gram_matrix(monkeypatch, build,
                                                                                              kept):
    """64 rows of 73 features: the fold keeps the rows (no Gram matrix) and its problems, each conv block's
    weights, energy, H^-1 and held-out rows, are those of the folded Gram matrix. Not so for a conv of two
    groups, whose blocks have 37 features each: Woodbury's identity would factorise 64 x 64 matrices for them."""
    from onnxprune.scoring import obs
    from onnxprune.scoring.consumers import find_consumers
    from onnxprune.scoring.reselect import CrossFold

    monkeypatch.setattr(obs, "MIN_ROWS", 1)
    monkeypatch.setattr(obs, "ROWS_PER_FEATURE", 0)
    analysis = analyze_model(load(build()))
    consumer = max(find_consumers(analysis), key=lambda c: c.groups)
    shape = analysis.shapes[consumer.tensor]
    activation = np.random.default_rng(5).standard_normal([5, *shape[1:]]).astype(np.float32) + 0.5
    folds = [obs.GramFold(consumer, 5, 1, np.random.default_rng(0)),  # by default, rows kept where fewer
             obs.GramFold(consumer, 5, 1, np.random.default_rng(0), may_keep_rows=False)]
    found = []
    for fold in folds:
        assert len(fold.chosen) == 64 < fold.features == 73
        fold.add(activation, 0, 5)
        found.append(fold.problems(analysis))
    assert [fold.keep_rows for fold in folds] == [kept, False]
    assert [fold.gram is None for fold in folds] == [kept, False]
    assert len(found[0]) == len(found[1]) == consumer.groups
    for (group, rows), (same, folded) in zip(*found):
        assert group == same and rows.block == folded.block
        np.testing.assert_array_equal(rows.weight, folded.weight)
        np.testing.assert_array_equal(rows.held, folded.held)
        assert rows.energy == pytest.approx(folded.energy, rel=1e-5)
        np.testing.assert_allclose(rows.hinv, folded.hinv, atol=1e-4 * np.abs(folded.hinv).max())
    cross = CrossFold(consumer, 5, 1, np.random.default_rng(0))  # re-selection folds its own products
    assert not cross.keep_rows and cross.gram is not None


@pytest.mark.parametrize("build", [models.conv_chain, models.grouped])
@pytest.mark.parametrize("held_gram", [False, True])
def test_the_held_out_rows_or_their_gram_factor_give_the_curve_of_their_gram_matrix(monkeypatch, held_gram, build):
    """Held-out rows up to twice the features stay rows (a factor of their Gram matrix), more are folded into
    a Gram matrix and factored: either way each conv block's greedy removal gets the held-out curve of its
    own features' Gram matrix."""
    from onnxprune.scoring import obs
    from onnxprune.scoring.consumers import find_consumers

    monkeypatch.setattr(obs.GramFold, "_held_gram", lambda self: held_gram)
    analysis = analyze_model(load(build()))
    consumer = max(find_consumers(analysis), key=lambda c: c.groups)
    rng = np.random.default_rng(4)
    shape = [d if isinstance(d, int) else 2 for d in analysis.shapes[consumer.tensor]]
    fold = obs.GramFold(consumer, 10, 5, np.random.default_rng(0))
    rows = []
    for i in range(5):
        activation = rng.standard_normal([2, *shape[1:]]).astype(np.float32)
        flat = consumer.batch_points(fold.chosen, 2 * i, 2)
        held = obs.held_out(2 * i + flat // consumer.positions)
        rows.append(np.concatenate([consumer.points(activation, flat)[held], np.ones((held.sum(), 1))], axis=1))
        fold.add(activation, 2 * i, 2)
    rows = np.concatenate(rows)
    found = fold.problems(analysis)
    assert (fold.held is not None) == held_gram and len(found) == consumer.groups > 0
    for group, problem in found:
        block = rows[:, obs.block_features(consumer, problem.block)]
        assert problem.held.shape == (block.shape[1], block.shape[1] if held_gram else len(rows))
        gram = block.T @ block / len(rows)
        np.testing.assert_allclose(problem.held @ problem.held.T, gram, rtol=1e-4, atol=1e-5 * np.abs(gram).max())
        channels = analysis.groups[group].channels
        curve = greedy_removal([problem], channels, steps=channels)[1]
        exact = Problem(problem.weight, problem.hinv, problem.columns, problem.energy, np.linalg.cholesky(gram))
        np.testing.assert_allclose(curve, greedy_removal([exact], channels, steps=channels)[1], rtol=1e-3, atol=1e-6)


def test_held_out_rows_beyond_twice_the_features_fold_into_a_gram_matrix(monkeypatch):
    from onnxprune.scoring import obs
    from onnxprune.scoring.consumers import find_consumers

    analysis = analyze_model(load(models.conv_chain()))
    consumer = find_consumers(analysis)[0]
    shape = analysis.shapes[consumer.tensor]
    width = consumer.fan_in * consumer.groups + 1
    for rows_per_feature, folded in ((1, False), (obs.ROWS_PER_FEATURE, True)):
        monkeypatch.setattr(obs, "ROWS_PER_FEATURE", rows_per_feature)
        monkeypatch.setattr(obs, "MIN_ROWS", 1)
        fold = obs.GramFold(consumer, 5, 1, np.random.default_rng(0))
        fold.add(np.random.default_rng(1).standard_normal([5, *shape[1:]]).astype(np.float32), 0, 5)
        fold.fold()
        assert (fold.held_count > 2 * width) == folded and (fold.held is not None) == folded
        assert bool(fold.waiting[1]) != folded and fold.held_count > 0


def test_a_held_out_gram_matrix_left_indefinite_by_rounding_is_still_factored():
    """Float32 rows summed into a rank-deficient Gram matrix can leave it slightly indefinite, which stops
    a Cholesky factorisation: the factor then comes from its eigenvectors, negative values cut to zero."""
    from types import SimpleNamespace

    from onnxprune.scoring.obs import GramFold

    rng = np.random.default_rng(5)
    basis = rng.standard_normal((8, 3))
    gram = basis @ basis.T  # rank 3 of 8
    values, vectors = np.linalg.eigh(gram)
    indefinite = gram - 1e-3 * np.outer(vectors[:, 0], vectors[:, 0])  # a negative eigenvalue beyond the jitter
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(indefinite)
    factor = GramFold._held_factor(SimpleNamespace(held=indefinite * 10, held_count=10), np.arange(8), None)
    np.testing.assert_allclose(factor @ factor.T, gram, atol=1e-4)


def test_keep_choices_rounded_stay_at_or_above_the_floor():
    """Counts rounded to eights that would fall below the floor are not offered: a quarter of 40 channels is
    10, which rounds to 8; 10% of 100 rounds to 8 too."""
    from onnxprune.scoring.obs import keep_choices

    assert keep_choices(40, 8, floor=0.25).tolist() == [16, 24, 32, 40]
    assert keep_choices(100, 8, floor=0.1).tolist() == [16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100]
    assert keep_choices(40, 1, floor=0.25).tolist() == list(range(10, 41))
    assert keep_choices(12, 8, floor=0.25).tolist() == [8, 12]
