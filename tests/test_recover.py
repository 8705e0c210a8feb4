"""Calibration-only recovery (--recover none|bias|lstsq): exactness on linear models, streaming equals
one-shot, finite results on badly conditioned data, every conv geometry reproduced, CLI and report."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import models
from onnxprune import PruneConfig, prune
from onnxprune.calib import CalibrationSet
from onnxprune.cli import main
from onnxprune.recover.lstsq import PARTS_FROM, NormalEquations, ridge_search, spread_corrected
from onnxprune.runtime import session

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_resnet.onnx"
MNIST_CALIB = ROOT / "models" / "mnist_calib.npz"


def run(model, feed):
    return session(model).run(None, feed)[0]


def calibration_for(model, count=64, seed=1, value=None):
    shape = [count] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    data = np.full(shape, value, np.float32) if value is not None else \
        np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return CalibrationSet({model.graph.input[0].name: data})


def rel_error(reference, result):
    return float(np.linalg.norm(reference - result) / np.linalg.norm(reference))


def low_rank_rows(rng, rows, rank, cols):
    """`rows` x `cols` whose rows span only `rank` dimensions (any `rank` of them span them all)."""
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))


def linear_conv_chain(seed=0, batch=None):
    """conv1 (3->8, 3x3) -> conv2 (8->6, 3x3, stride 2) -> Flatten -> Gemm (6*4*4 -> 5), no nonlinearity.
    conv1's 8 filters (and biases) span only 3 dimensions, conv2's 6 only 2, so any 3 (2) kept channels
    carry all the others."""
    rng = np.random.default_rng(seed)
    w1 = low_rank_rows(rng, 8, 3, 3 * 9 + 1) / 5
    w2 = low_rank_rows(rng, 6, 2, 8 * 9) / 8
    inits = [numpy_helper.from_array(w1[:, :-1].reshape(8, 3, 3, 3).astype(np.float32), "conv1.weight"),
             numpy_helper.from_array(w1[:, -1].astype(np.float32), "conv1.bias"),
             numpy_helper.from_array(w2.reshape(6, 8, 3, 3).astype(np.float32), "conv2.weight"),
             numpy_helper.from_array((rng.standard_normal((96, 5)) / 10).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h1", "conv2.weight"], ["h2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Flatten", ["h2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc")]
    return models.make_model(nodes, [("x", [batch or 1, 3, 8, 8])], ["y"], inits)


def linear_gemm_chain(seed=0, batch=1):
    """Gemm (16->8) -> Gemm (8->4, transB): the first layer's 8 outputs span 3 dimensions."""
    rng = np.random.default_rng(seed)
    w1 = low_rank_rows(rng, 8, 3, 17) / 4
    inits = [numpy_helper.from_array(w1[:, :-1].T.astype(np.float32), "g1.weight"),
             numpy_helper.from_array(w1[:, -1].astype(np.float32), "g1.bias"),
             numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "g2.weight"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "g2.bias")]
    nodes = [helper.make_node("Gemm", ["x", "g1.weight", "g1.bias"], ["h"], name="g1"),
             helper.make_node("Gemm", ["h", "g2.weight", "g2.bias"], ["y"], name="g2", transB=1, alpha=0.5, beta=2.0)]
    return models.make_model(nodes, [("x", [batch, 16])], ["y"], inits)


def pruned_with(model, method, calibration, filters=0.5, **extra):
    config = PruneConfig(filters=filters, round_to=1, calibration=calibration, recover=method, **extra)
    return prune(model, config)


# ---------------------------------------------------------------- exactness on linear models


@pytest.mark.parametrize("build", [linear_conv_chain, linear_gemm_chain])
def test_lstsq_recovers_a_linear_model_exactly_when_kept_channels_span_the_removed(build):
    model = build()
    calibration = calibration_for(model, 128)
    feed = {"x": calibration_for(model, 16, seed=7).arrays["x"][:1]}
    reference = run(model, feed)
    plain = pruned_with(model, "none", calibration)
    fitted = pruned_with(model, "lstsq", calibration)
    assert rel_error(reference, run(plain.model, feed)) > 0.05  # pruning alone loses a lot
    assert rel_error(reference, run(fitted.model, feed)) < 1e-3  # held-out input: the fit is exact
    layers = fitted.report["recovery"]["layers"]
    assert layers and all(layer["status"] == "recovered" for layer in layers)
    assert all(layer["error_after"] < 1e-3 < layer["error_before"] for layer in layers)


def test_lstsq_does_not_create_exactness_that_does_not_exist():
    """With full-rank filters the removed channels are lost: recovery helps but cannot be exact."""
    model = models.conv_chain()
    calibration = calibration_for(model, 32)
    fitted = pruned_with(model, "lstsq", calibration)
    plain = pruned_with(model, "none", calibration)
    assert fitted.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]
    assert fitted.report["fidelity"]["rel_l2"] > 1e-3


def test_bias_correction_removes_the_mean_shift():
    model = linear_conv_chain()
    calibration = calibration_for(model, 64)
    plain = pruned_with(model, "none", calibration)
    shifted = pruned_with(model, "bias", calibration)
    layer = shifted.report["recovery"]["layers"][0]
    assert layer["status"] == "recovered" and layer["error_after"] < layer["error_before"]
    assert shifted.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]
    weights = {t.name: numpy_helper.to_array(t) for t in shifted.model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    conv2 = next(n for n in shifted.model.graph.node if n.name == "conv2")
    np.testing.assert_array_equal(weights[conv2.input[1]], original["conv2.weight"])  # weights untouched
    assert len(conv2.input) == 3  # a bias was added to carry the shift


# ---------------------------------------------------------------- streaming and conditioning


@pytest.mark.usefixtures("float64_products")
def test_streaming_normal_equations_equal_the_one_shot_fit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 2, 7))
    y = np.einsum("rgd,gdm->rgm", x, rng.standard_normal((2, 7, 3))) + rng.standard_normal((500, 2, 3)) * 0.1 + 2.0
    whole = NormalEquations(2, 7, 3)
    whole.add(x, y)
    chunked = NormalEquations(2, 7, 3)
    for start in range(0, 500, 37):
        chunked.add(x[start:start + 37], y[start:start + 37])
    for a, b in zip(whole.solve(), chunked.solve()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # and the normal equations give the ordinary least-squares answer (ridge 0) of each group
    weight, bias = whole.solve(ridge=0.0)
    for g in range(2):
        design = np.hstack([x[:, g], np.ones((500, 1))])
        expected = np.linalg.lstsq(design, y[:, g], rcond=None)[0]
        np.testing.assert_allclose(weight[g], expected[:-1], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(bias[g], expected[-1], rtol=1e-7, atol=1e-9)
    residual = sum(np.sum((y[:, g] - x[:, g] @ weight[g] - bias[g]) ** 2) for g in range(2))
    assert whole.residual(weight, bias) == pytest.approx(residual, rel=1e-6)


@pytest.mark.usefixtures("float64_products")
@pytest.mark.parametrize("groups, features, outputs", [(1, PARTS_FROM + 44, 9), (1, PARTS_FROM, 600), (1, 40, 60),
                                                      (3, 50, 9)])
def test_products_in_parts_sum_to_x_transpose_x_whatever_order_they_run_in(groups, features, outputs):
    """`add_parts` leaves a batch's products to functions writing apart (two workers take them side by side),
    and the batches' means go in when the sums are read: x^T x and x^T y are the plain ones."""
    rng = np.random.default_rng(features)
    x = 2.0 + rng.standard_normal((900, groups, features))
    y = rng.standard_normal((900, groups, outputs)) - 1.0
    equations = NormalEquations(groups, features, outputs)
    for start in range(0, 900, 300):
        pending = equations.add_parts(x[start:start + 300], y[start:start + 300])
        assert len(pending) == (3 if groups == 1 and features >= PARTS_FROM else 1)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda part: part(), pending[::-1]))
    np.testing.assert_allclose(equations.xx, np.einsum("rgd,rge->gde", x, x), rtol=1e-9)
    np.testing.assert_allclose(equations.xy, np.einsum("rgd,rgm->gdm", x, y), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(equations.sx, x.sum(0), rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_float32_products_fit_as_float64_ones_even_far_from_zero(groups):
    """Recovery's per-batch products are float32, centred on the batch's mean: a feature whose mean is a
    hundred times its spread (a BatchNorm'd input's offset, an image channel) fits as with float64 products."""
    rng = np.random.default_rng(0)
    x = (3.0 + 0.03 * rng.standard_normal((6000, groups, 120))).astype(np.float32)
    y = np.einsum("rgd,gdm->rgm", x.astype(np.float64), rng.standard_normal((groups, 120, 5)))
    y += 0.01 * rng.standard_normal(y.shape)
    fast, exact = NormalEquations(groups, 120, 5), NormalEquations(groups, 120, 5)
    exact.products = np.float64
    for start in range(0, 6000, 1000):
        fast.add(x[start:start + 1000], y[start:start + 1000])
        exact.add(x[start:start + 1000], y[start:start + 1000])
    for ridge in (1e-6, 1e-2):
        weight, bias = fast.solve(ridge)
        np.testing.assert_allclose(weight, exact.solve(ridge)[0], rtol=1e-4, atol=1e-4 * np.abs(weight).max())
        assert fast.residual(weight, bias) == pytest.approx(exact.residual(weight, bias), rel=1e-3)


@pytest.mark.usefixtures("float64_products")
@pytest.mark.parametrize("groups, features, outputs, rows", [(1, 60, 7, 25), (3, 40, 4, 20), (2, 50, 60, 13)])
def test_fewer_rows_than_features_solve_from_the_rows_as_from_the_sums(groups, features, outputs, rows):
    """A layer reading one row per sample (a classifier head) keeps its rows and solves an n x n system: the
    same weights, residuals and output spread as the D x D normal equations, at every ridge, with or without
    an intercept and a prior (to 1e-5: the D x D system at the smallest ridge is the ill-conditioned one)."""
    rng = np.random.default_rng(features)
    x = rng.standard_normal((rows, groups, features)) + 2.0
    y = rng.standard_normal((rows, groups, outputs)) + np.arange(groups)[None, :, None]
    prior = rng.standard_normal((groups, features, outputs))
    kept = NormalEquations(groups, features, outputs)
    kept.add(x[:5], y[:5])
    kept.add(x[5:], y[5:])
    summed = NormalEquations(groups, features, outputs)
    summed.add(x, y)
    summed.rows = None
    assert kept.rows is not None
    for ridge in (1e-6, 1e-2, 1.0, 1e3):
        for intercept in (True, False):
            for start in (None, prior):
                weight, bias = kept.solve(ridge, intercept, start)
                expected_weight, expected_bias = summed.solve(ridge, intercept, start)
                np.testing.assert_allclose(weight, expected_weight, rtol=1e-5, atol=1e-7 * np.abs(expected_weight).max())
                np.testing.assert_allclose(bias, expected_bias, rtol=1e-5, atol=1e-7)
                assert kept.residual(weight, bias) == pytest.approx(summed.residual(weight, bias), rel=1e-8, abs=1e-8)
    np.testing.assert_allclose(kept.output_variance(prior), summed.output_variance(prior), rtol=1e-9)
    # more rows than half the features: the rows are let go, and so are two kept sets merged past them
    half = NormalEquations(groups, features, outputs)
    half.add(x, y)
    assert half.merged(kept).rows is None if 2 * rows > features // 2 else half.merged(kept).rows is not None
    half.add(np.repeat(x, features // rows + 1, axis=0), np.repeat(y, features // rows + 1, axis=0))
    assert half.rows is None


def _summed(x, y):
    """Normal equations of all the rows, solved from their sums (the rows not kept)."""
    summed = NormalEquations(x.shape[1], x.shape[2], y.shape[2])
    summed.add(x, y)
    summed.rows = None
    return summed


@pytest.mark.usefixtures("float64_products")
@pytest.mark.parametrize("groups", [1, 3])
def test_two_kept_sets_merged_solve_as_all_their_rows(groups):
    """The final fit solves the fit's and the held-out rows merged: each x stays with its y and both sets' rows
    are there (the same weights, residuals and spread as the sums of all rows); a group with no spread keeps
    the prior weights (its ridge falls back to 1.0); equations with nothing added reconstruct nothing."""
    rng = np.random.default_rng(5)
    features, outputs = 60, 4
    x = rng.standard_normal((20, groups, features)) + 1.0
    y = rng.standard_normal((20, groups, outputs))
    x[:, groups - 1] = 2.0
    prior = rng.standard_normal((groups, features, outputs))
    fit, held = NormalEquations(groups, features, outputs), NormalEquations(groups, features, outputs)
    fit.add(x[:8], y[:8])
    fit.add(x[8:16], y[8:16])
    held.add(x[16:], y[16:])
    both = fit.merged(held)
    assert both.rows is not None
    summed = _summed(x, y)
    for intercept in (True, False):
        weight, bias = both.solve(0.1, intercept, prior)
        expected_weight, expected_bias = summed.solve(0.1, intercept, prior)
        np.testing.assert_allclose(weight, expected_weight, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(bias, expected_bias, rtol=1e-7, atol=1e-10)
        assert both.residual(weight, bias) == pytest.approx(summed.residual(weight, bias), rel=1e-8)
        if intercept:
            np.testing.assert_allclose(weight[-1], prior[-1], rtol=1e-12)
    for a, b in zip(spread_corrected(both, prior, None), spread_corrected(summed, prior, None)):
        np.testing.assert_allclose(a, b, rtol=1e-8)
    assert NormalEquations(groups, features, outputs).residual(prior, np.zeros((groups, outputs))) == 0.0


def test_the_kept_rows_do_not_hold_the_callers_larger_array():
    """LstsqFit hands over a batch's fit and held-out rows as slices of one buffer, and the held-out set keeps its
    rows about five times longer than the fit's: kept views would pin every batch's buffer."""
    batch = np.random.default_rng(0).standard_normal((1000, 1, 20))
    equations = NormalEquations(1, 20, 2)
    equations.add(batch[:3], batch[:3, :, :2])
    assert equations.rows is not None
    assert not any(np.shares_memory(kept, batch) for kept in (*equations.rows[0], *equations.rows[1]))


def test_ridge_zero_on_repeated_rows_is_the_least_squares_fit():
    """Ridge 0 (`recover(ridge=0.0)`) on fewer rows than features with a sample repeated: the kernel X X^T is
    singular, and np.linalg.solve need not say so; the fit still reaches the least-squares optimum."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 1, 16))
    x[3] = x[2]
    y = rng.standard_normal((6, 1, 2))
    kept = NormalEquations(1, 16, 2)
    kept.add(x, y)
    assert kept.rows is not None
    for intercept in (False, True):
        weight, bias = kept.solve(0.0, intercept)
        centre = x[:, 0].mean(0) if intercept else 0.0
        target = y[:, 0] - (y[:, 0].mean(0) if intercept else 0.0)
        best = np.linalg.lstsq(x[:, 0] - centre, target, rcond=None)[0]
        optimum = np.sum((target - (x[:, 0] - centre) @ best) ** 2)
        assert np.abs(weight).max() < 1e3
        assert kept.residual(weight, bias) == pytest.approx(optimum, rel=1e-6, abs=1e-9)


@pytest.mark.usefixtures("float64_products")
def test_the_sums_are_centred_once_per_count_and_again_after_more_rows():
    """The ridge search solves one set of sums at several ridges: they are centred once, and rows added
    afterwards are not left out of the next solve."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 1, 5)) + 3.0
    y = x @ rng.standard_normal((1, 5, 2)) + rng.standard_normal((120, 1, 2))
    equations = NormalEquations(1, 5, 2)
    equations.add(x[:60], y[:60])
    equations.solve(0.1)
    centred = equations._centered(True)
    equations.solve(1e-3)
    assert equations._centered(True) is centred
    equations.add(x[60:], y[60:])
    whole = NormalEquations(1, 5, 2)
    whole.add(x, y)
    for a, b in zip(equations.solve(0.1), whole.solve(0.1)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    equations.release()
    assert equations._centered_at is None


def test_the_ridge_search_sums_are_released_before_the_final_fit_solves_its_own(monkeypatch):
    """The final fit solves the fit and held-out sums merged: the fit's centred copy (F x F per group), which
    only the ridge search needed, is gone by then, so a layer holds one centred copy at a time."""
    from onnxprune.recover import recover

    fits, released = {}, []
    merged, solve = NormalEquations.merged, NormalEquations.solve

    def merging(self, other):
        basis = merged(self, other)
        fits[id(basis)] = self
        return basis

    def solving(self, *args, **kwargs):
        if id(self) in fits:
            released.append(fits[id(self)]._centered_at is None)
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(NormalEquations, "merged", merging)
    monkeypatch.setattr(NormalEquations, "solve", solving)
    model = linear_gemm_chain(seed=3, batch="N")
    loaded, pruned, masks = _first_group_cut(model)
    recover(loaded.model, pruned, calibration_for(model, 64), "lstsq", masks, loaded.shapes)
    assert released and all(released)


@pytest.mark.parametrize("hold_out", [True, False])
def test_with_samples_held_out_the_final_fit_is_the_ridge_searchs_own_solve(monkeypatch, hold_out):
    """Fitted without the held-out samples (`hold_out`, the pipeline's default), the final system is one the
    ridge search solved: its fit is taken, not solved again. Fitted on every sample, the merged sums are
    solved once more."""
    from onnxprune.recover import recover

    solves, solve = [], NormalEquations.solve

    def solving(self, ridge, *args, **kwargs):
        solves.append((id(self), ridge))
        return solve(self, ridge, *args, **kwargs)

    monkeypatch.setattr(NormalEquations, "solve", solving)
    model = linear_gemm_chain(seed=3, batch="N")
    loaded, pruned, masks = _first_group_cut(model)
    recovered, report = recover(loaded.model, pruned, calibration_for(model, 64), "lstsq", masks, loaded.shapes,
                                hold_out=hold_out)
    layers = [layer for layer in report["layers"] if layer.get("status") == "recovered"]
    assert len(layers) == 1
    search = solves[0][0]  # the fit's sums, which the ridge search solves
    assert solves.count((search, layers[0]["ridge"])) == 1
    assert len([pair for pair in solves if pair[0] != search]) == (0 if hold_out else 1)


def gemm_fan(branches: int, hidden: int = 300):
    """x -> Gemm (16 -> hidden) -> Relu -> `branches` Gemms (hidden -> 8) reading it: one level of that many."""
    b = models.Builder(seed=branches)
    h = b.relu("relu", b.node("Gemm", "a", ["x", b.randn("a.w", [16, hidden], 0.25), b.randn("a.b", [hidden], 0.1)]))
    for i in range(branches):
        b.output(b.node("Gemm", f"b{i}", [h, b.randn(f"b{i}.w", [hidden, 8], 0.05), b.randn(f"b{i}.b", [8])]), f"y{i}")
    return b.model([("x", ["N", 16])], [f"y{i}" for i in range(branches)])


@pytest.mark.parametrize("branches", [1, 3])
def test_only_a_levels_one_layer_hands_its_products_to_the_pool(monkeypatch, branches):
    """A level of one layer hands the pool its batch's products in parts (both workers on it); a level of
    several keeps each layer's parts in its own job: queued parts each hold a centred copy of their layer's batch
    (with 16 layers a level's peak memory was 4x what it was before parts)."""
    from onnxprune.recover import passes, recover

    pools, add = [], passes._add

    def adding(pool, *args):
        pools.append(pool)
        return add(pool, *args)

    monkeypatch.setattr(passes, "_add", adding)
    model = gemm_fan(branches)
    loaded, pruned, masks = _first_group_cut(model)
    _, report = recover(loaded.model, pruned, calibration_for(model, 64), "lstsq", masks, loaded.shapes)
    assert [layer.get("status") for layer in report["layers"]] == ["recovered"] * branches
    assert pools and all((pool is None) == (branches > 1) for pool in pools)


def _first_group_cut(model):
    """(the loaded model, the model with channels 0, 2, 5 and 7 of its first prunable group kept, the masks)."""
    from onnxprune.loading import load
    from onnxprune.rewrite import apply_channel_plan, keep_masks
    from onnxprune.stages import analyze_model
    import onnx_graphsurgeon as gs

    loaded = load(model)
    analysis = analyze_model(loaded)
    masks = keep_masks(analysis, {analysis.prunable_groups()[0].index: np.array([0, 2, 5, 7])})
    apply_channel_plan(analysis, masks)
    return loaded, gs.export_onnx(analysis.graph), masks


def test_recovery_does_not_depend_on_the_batch_size():
    """Batches of 4 and one batch of 64 accumulate the same equations (no sampling at this size): the recovered
    models compute the same outputs. (With float32 products their weights at ridge 1e-6 on this noiseless chain
    differ by up to 10%, in directions that change the outputs by 1e-7.)"""
    from onnxprune.recover import recover

    model = linear_gemm_chain(seed=3, batch="N")
    calibration = calibration_for(model, 64)
    loaded, pruned, masks = _first_group_cut(model)
    fits = [recover(loaded.model, pruned, calibration, "lstsq", masks, loaded.shapes, batch_size=b)[0]
            for b in (4, 64)]
    inputs = {model.graph.input[0].name: calibration_for(model, 32, seed=7).arrays[model.graph.input[0].name]}
    small, large = (session(m).run(None, inputs)[0] for m in fits)
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-5 * np.abs(large).max())


def test_recovery_of_a_small_model_writes_no_model_file(monkeypatch):
    """The streams' pieces and the final check's whole models are read by onnxruntime from memory when small:
    no temporary file is written and removed for each of them."""
    from onnxprune import runtime
    from onnxprune.recover import recover

    model = linear_gemm_chain(seed=3, batch="N")
    loaded, pruned, masks = _first_group_cut(model)
    written = []
    real_write = runtime.write_model
    monkeypatch.setattr(runtime, "write_model", lambda *a, **k: written.append(a[1]) or real_write(*a, **k))
    _, report = recover(loaded.model, pruned, calibration_for(model, 64), "lstsq", masks, loaded.shapes)
    assert report["recovered"] and "output_error_held_out" in report
    assert written == []


def test_recovery_given_the_originals_held_out_outputs_does_not_run_the_original(monkeypatch):
    """The pipeline already has the original's outputs on the held-out samples (`Baseline.reference`): the final
    check takes them instead of building a session of the original and running it again, to the same errors."""
    from onnxprune.recover import passes, recover
    from onnxprune.validate.compare import run_model

    model = linear_gemm_chain(seed=3, batch="N")
    loaded, pruned, masks = _first_group_cut(model)
    calibration = calibration_for(model, 64)
    _, plain = recover(loaded.model, pruned, calibration, "lstsq", masks, loaded.shapes)
    reference = run_model(session(loaded.model), passes.held_out_samples(calibration), 32)
    built = []
    real_session = passes.short_lived_session
    monkeypatch.setattr(passes, "short_lived_session", lambda piece, *a: built.append(piece) or real_session(piece, *a))
    _, given = recover(loaded.model, pruned, calibration, "lstsq", masks, loaded.shapes, reference=reference)
    assert given["output_error_held_out"] == plain["output_error_held_out"]
    assert built and not any(piece is loaded.model for piece in built)


def test_a_batch_one_model_is_checked_on_the_held_out_samples_only(monkeypatch):
    """Without the original's outputs given, a model whose fixed batch is 1 runs (the original and every candidate)
    on the held-out fifth only: whole batches are needed above 1 only."""
    from onnxprune.recover import passes, recover

    model = linear_gemm_chain(seed=3, batch=1)
    loaded, pruned, masks = _first_group_cut(model)
    calibration = calibration_for(model, 64)
    counts = []
    real_run = passes.run_model
    monkeypatch.setattr(passes, "run_model", lambda sess, data, *a: counts.append(data.count) or real_run(sess, data, *a))
    _, report = recover(loaded.model, pruned, calibration, "lstsq", masks, loaded.shapes, batch_size=1)
    assert report["recovered"]
    assert counts and set(counts) == {passes.held_out_samples(calibration).count}


@pytest.mark.parametrize("setting", [{"scorer": "l1"}, {"scorer": "obs", "reselect": True}])
def test_the_pipeline_hands_recovery_the_originals_held_out_outputs(monkeypatch, setting):
    """`prune` with calibration data measures fidelity on its held-out fifth, whose original outputs it has:
    recovery's final check (also the one re-selection runs first) builds sessions of its candidates only."""
    from onnxprune import stages
    from onnxprune.recover import passes

    built, originals = [], []
    real_session, real_recover = passes.short_lived_session, stages.recover
    monkeypatch.setattr(passes, "short_lived_session", lambda piece, *a: built.append(piece) or real_session(piece, *a))
    monkeypatch.setattr(stages, "recover", lambda original, *a, **k: originals.append(original) or
                        real_recover(original, *a, **k))
    result = prune(str(MNIST), PruneConfig(filters=0.5, calibration=str(MNIST_CALIB), calib_samples=64, **setting))
    assert result.report["recovery"]["recovered"]
    assert len(originals) == 1 + bool(setting.get("reselect"))
    assert built and not any(piece is original for piece in built for original in originals)


def test_collinear_and_constant_features_stay_finite():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 1, 3))
    x = np.concatenate([base, base[:, :, :1] * 2, np.ones((200, 1, 1)) * 3, np.zeros((200, 1, 1))], axis=2)
    y = base @ rng.standard_normal((1, 3, 2))
    eq = NormalEquations(1, 6, 2)
    eq.add(x, y)
    weight, bias = eq.solve()
    assert np.isfinite(weight).all() and np.isfinite(bias).all()
    assert eq.residual(weight, bias) / np.sum(y * y) < 1e-3
    empty = NormalEquations(1, 4, 2)
    empty.add(np.zeros((10, 1, 4)), np.ones((10, 1, 2)))
    weight, bias = empty.solve()
    assert np.isfinite(weight).all()
    np.testing.assert_allclose(bias, 1.0)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_calibration_data_gives_a_finite_model(value):
    model = models.residual_downsample()
    calibration = calibration_for(model, 8, value=value)
    result = pruned_with(model, "lstsq", calibration)
    out = run(result.model, {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)})
    assert np.isfinite(out).all()
    for tensor in result.model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        assert not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all()


def test_duplicated_channels_stay_finite():
    """Two identical filters: their outputs are collinear inputs of the next layer."""
    model = models.conv_chain()
    weights = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(weights["conv1.weight"]).copy()
    b = numpy_helper.to_array(weights["conv1.bias"]).copy()
    w[1], b[1] = w[0], b[0]
    weights["conv1.weight"].CopyFrom(numpy_helper.from_array(w, "conv1.weight"))
    weights["conv1.bias"].CopyFrom(numpy_helper.from_array(b, "conv1.bias"))
    result = pruned_with(model, "lstsq", calibration_for(model, 16), filters=0.25)
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in result.model.graph.initializer)
    assert result.report["fidelity"]["rel_l2"] < pruned_with(model, "none", calibration_for(model, 16),
                                                             filters=0.25).report["fidelity"]["rel_l2"]


# ---------------------------------------------------------------- every layer geometry


GEOMETRIES = ["conv_chain", "conv_bn_relu", "residual", "residual_downsample", "concat", "split", "depthwise",
              "depthwise_multiplier", "grouped", "conv_transpose", "conv_transpose_grouped", "flatten_gemm",
              "reshape_gemm", "mlp", "mlp_gemm", "transpose_matmul", "squeeze_excite", "pad", "resize"]


@pytest.mark.parametrize("name", GEOMETRIES)
def test_lstsq_reproduces_every_layer_and_never_hurts(name):
    """The self-check (current weights applied to the gathered inputs give the layer's actual output)
    passes for every layer kind, so no layer is skipped; and re-fitting lowers the in-sample error."""
    model = models.all_builders()[name]()
    calibration = calibration_for(model, 16)
    fitted = pruned_with(model, "lstsq", calibration)
    plain = pruned_with(model, "none", calibration)
    layers = fitted.report["recovery"]["layers"]
    assert layers, "some layer consumes pruned channels"
    assert not [l for l in layers if l["status"] == "skipped"], layers
    assert all(l["error_after"] <= l["error_before"] for l in layers)
    assert fitted.report["fidelity"]["rel_l2"] <= plain.report["fidelity"]["rel_l2"] + 1e-6


def test_recovery_that_worsens_the_outputs_is_reverted(monkeypatch):
    """Each fit only lowers its own layer's error; the model's outputs are checked on the held-out
    calibration samples, and a recovery that moved them away from the original's is undone."""
    from onnxprune.recover.layers import LinearView

    model = models.conv_bn_relu()
    calibration = calibration_for(model, 40)
    plain = pruned_with(model, "none", calibration)
    honest = pruned_with(model, "lstsq", calibration)
    assert honest.report["recovery"]["reverted"] is False
    check = honest.report["recovery"]["output_error_held_out"]
    assert check["after"] < check["before"]

    write = LinearView.write
    monkeypatch.setattr(LinearView, "write", lambda self, inits, weight, bias: write(
        self, inits, None if weight is None else -3 * weight, bias))  # a fit gone wrong
    broken = pruned_with(model, "lstsq", calibration)
    recovery = broken.report["recovery"]
    assert recovery["reverted"] is True and recovery["recovered"] == 0
    assert "unrecovered model is kept" in recovery["note"]
    assert recovery["output_error_held_out"]["after"] > recovery["output_error_held_out"]["before"]
    assert broken.report["fidelity"]["rel_l2"] == pytest.approx(plain.report["fidelity"]["rel_l2"], abs=1e-6)


def test_the_held_out_check_compares_class_id_outputs_by_agreement():
    """A model whose only output is an ArgMax (int64 class ids) is checked by the fraction of ids that
    differ from the original's."""
    model = models.conv_bn_relu()
    scores = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("ArgMax", [scores], ["ids"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, None))
    result = pruned_with(model, "lstsq", calibration_for(model, 40))
    check = result.report["recovery"]["output_error_held_out"]
    assert 0 <= check["after"] <= 1 and 0 <= check["before"] <= 1


def test_a_matmul_offset_goes_into_the_add_after_it():
    """MatMul has no bias: its fitted offset is added to the constant of the Add that follows it."""
    model = models.mlp()
    calibration = calibration_for(model, 32)
    fitted, plain = (pruned_with(model, m, calibration) for m in ("lstsq", "none"))
    consts = [{t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer} for r in (fitted, plain)]
    add = next(n for n in fitted.model.graph.node if n.name == "fc2_bias")
    assert not np.allclose(consts[0][add.input[1]], consts[1]["fc2_bias.bias"])
    assert [l["name"] for l in fitted.report["recovery"]["layers"]] == ["fc2"]


def test_conv_attributes_are_honoured():
    """Strides, dilations, asymmetric pads, auto_pad and a 1-D conv all pass the self-check."""
    rng = np.random.default_rng(0)
    cases = [dict(strides=[2, 1], dilations=[1, 2], pads=[0, 2, 1, 1]), dict(auto_pad="SAME_UPPER", strides=[2, 2]),
             dict(auto_pad="SAME_LOWER", strides=[2, 2]), dict(auto_pad="VALID", dilations=[2, 2])]
    for attrs in cases:
        inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
                 numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")]
        nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", **attrs)]
        model = models.make_model(nodes, [("x", [1, 3, 11, 10])], ["y"], inits)
        layers = pruned_with(model, "lstsq", calibration_for(model, 8)).report["recovery"]["layers"]
        assert [l["status"] for l in layers] == ["recovered"], (attrs, layers)


def test_a_layer_recovery_cannot_reproduce_is_skipped_with_a_reason(monkeypatch):
    from onnxprune.ops import conv as conv_module

    real = conv_module.conv_patches
    monkeypatch.setattr(conv_module, "conv_patches", lambda *a: real(*a)[:, ::-1])  # a wrong im2col
    model = models.conv_chain()
    result = pruned_with(model, "lstsq", calibration_for(model, 8))
    layer = result.report["recovery"]["layers"][0]
    assert layer["status"] == "skipped" and "could not be reproduced" in layer["reason"]
    plain = pruned_with(model, "none", calibration_for(model, 8))
    assert result.report["fidelity"]["rel_l2"] == pytest.approx(plain.report["fidelity"]["rel_l2"])


def test_a_conv_whose_outputs_each_read_what_they_read_before_is_not_re_fitted():
    """A depthwise conv cut in its channels computes its kept outputs from the same inputs as before: only the
    conv after it, which lost input channels, is re-fitted. A grouped conv whose groups lost channels is."""
    from tests.ops.test_conv import depthwise

    for model, fitted in ((depthwise(), ["conv2"]), (models.grouped(), ["gconv1", "conv2"])):
        layers = pruned_with(model, "lstsq", calibration_for(model, 16)).report["recovery"]["layers"]
        assert [layer["name"] for layer in layers] == fitted


@pytest.mark.parametrize("method, runs_layers_twice", [("lstsq", False), ("bias", True)])
def test_only_bias_correction_runs_the_layers_before_their_fit(monkeypatch, method, runs_layers_twice):
    """Least squares needs a layer's own output with its current weights only for the self-check on the first
    batch: the pruned stream does not run the layers before their fit (they run once, with the new weights),
    and the check still sees a wrong reading of the layer (test above). Bias correction needs that output for
    every batch."""
    from onnxprune.recover import stream as stream_module

    runs, real_run = [], stream_module.Stream.run

    def recording(self, wanted, provisional=frozenset()):
        runs.append(bool(provisional))
        return real_run(self, wanted, provisional)

    monkeypatch.setattr(stream_module.Stream, "run", recording)
    model = models.conv_chain()
    result = pruned_with(model, method, calibration_for(model, 8))
    assert result.report["recovery"]["recovered"] > 0
    assert any(runs) == runs_layers_twice


def _conv_flatten_matmul():
    """conv1 (no bias) -> Relu -> conv2 (stride 2, no bias) -> Flatten -> MatMul, on 16x16: 2048 output rows of
    conv2 per batch of 32, and all-zero features for a blank input."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((6, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal((384, 5)) / 10).astype(np.float32), "fc.weight")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["h2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Flatten", ["h2"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc.weight"], ["y"], name="fc")]
    return models.make_model(nodes, [("x", ["N", 3, 16, 16])], ["y"], inits)


@pytest.mark.parametrize("wrong", [False, True])
def test_the_self_check_waits_for_a_batch_whose_rows_read_anything(monkeypatch, wrong):
    """The first batch is blank (its features all zero, which any reading of the layer reproduces): the check is
    made on the next batch, on rows spread over it. A correct reading of the layer passes it, a wrong one does
    not."""
    from onnxprune.ops import conv as conv_module

    if wrong:
        real = conv_module.conv_patches
        monkeypatch.setattr(conv_module, "conv_patches", lambda *a: real(*a)[:, ::-1])
    x = np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32)
    x[:32] = 0
    result = pruned_with(_conv_flatten_matmul(), "lstsq", CalibrationSet({"x": x}), calib_batch=32)
    status = {layer["name"]: layer["status"] for layer in result.report["recovery"]["layers"]}
    assert status["conv2"] == ("skipped" if wrong else "recovered")


def test_the_self_check_takes_a_layers_constant_offset():
    """A Gemm whose C is one number: its offset is part of the output the check compares."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "g1.weight"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "g1.bias"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "g2.weight"),
             numpy_helper.from_array(np.array(5.0, np.float32), "g2.c")]
    nodes = [helper.make_node("Gemm", ["x", "g1.weight", "g1.bias"], ["h"], name="g1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "g2.weight", "g2.c"], ["y"], name="g2")]
    model = models.make_model(nodes, [("x", ["N", 16])], ["y"], inits)
    layers = pruned_with(model, "lstsq", calibration_for(model, 64)).report["recovery"]["layers"]
    assert [(layer["name"], layer["status"]) for layer in layers] == [("g2", "recovered")]


# ---------------------------------------------------------------- pipeline, report, CLI


def test_default_is_lstsq_with_calibration_data_and_none_without():
    model = models.conv_chain()
    assert pruned_with(model, None, calibration_for(model, 8)).report["recovery"]["method"] == "lstsq"
    without = prune(model, PruneConfig(filters=0.5, round_to=1))
    assert without.report["recovery"]["method"] == "none" and without.report["recovery"]["layers"] == []


def test_forced_recovery_on_synthetic_data_says_so():
    result = prune(models.conv_chain(), PruneConfig(filters=0.5, round_to=1, recover="lstsq"))
    assert "synthetic" in result.report["recovery"]["note"]


def test_recovery_is_deterministic():
    model = models.residual_downsample()
    a, b = (pruned_with(model, "lstsq", calibration_for(model, 16), seed=5).model.SerializeToString() for _ in "ab")
    assert a == b


def test_recovery_after_low_rank_refits_the_second_factors():
    model = models.mlp()
    calibration = calibration_for(model, 64)
    plain = prune(model, PruneConfig(filters=0, rank=0.5, calibration=calibration, recover="none"))
    fitted = prune(model, PruneConfig(filters=0, rank=0.5, calibration=calibration, recover="lstsq"))
    factorized = [l["node"] for l in fitted.report["lowrank"]["layers"] if l["status"] == "factorized"]
    assert factorized
    recovered = [l for l in fitted.report["recovery"]["layers"] if l["status"] == "recovered"]
    assert recovered
    assert fitted.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]


def test_cli_recover_option_and_report(tmp_path):
    out, report_path, calib = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "calib.npz"
    with np.load(MNIST_CALIB) as data:
        np.savez(calib, input=data["input"][:96])
    args = [str(MNIST), str(out), "--filters", "0.5", "--calib", str(calib), "--report", str(report_path)]
    results = {}
    for method in ("none", "bias", "lstsq"):
        result = CliRunner().invoke(main, args + ["--recover", method])
        assert result.exit_code == 0, result.output
        report = json.loads(report_path.read_text())
        assert report["recovery"]["method"] == method
        results[method] = report["fidelity"]["top1_agreement"]
        if method != "none":
            assert f"recovery  {method}:" in result.output
    assert results["lstsq"] > results["none"] + 0.3
    layers = report["recovery"]["layers"]
    assert {"name", "op", "level", "error_before", "error_after", "status"} <= set(layers[0])
    assert report["recovery"]["levels"] == len({l["level"] for l in layers})
    assert report["recovery"]["passes"] == 2  # each model walked once, level by level
    assert onnx.load(str(out)).graph.node


def test_cli_rejects_an_unknown_method(tmp_path):
    result = CliRunner().invoke(main, [str(MNIST), str(tmp_path / "o.onnx"), "--recover", "magic"])
    assert result.exit_code == 2


def test_finetune_without_onnxruntime_training_says_how_to_get_it(tmp_path):
    try:
        import onnxruntime.training  # noqa: F401
        pytest.skip("onnxruntime-training is installed here: the training tests cover this environment")
    except ImportError:
        pass
    for args in ([str(MNIST), str(tmp_path / "o.onnx"), "--finetune-steps", "3"],
                 ["export-training", str(MNIST), str(tmp_path / "artifacts")],
                 ["finetune", str(MNIST), str(tmp_path / "o.onnx"), "--teacher", str(MNIST), "--calib", str(MNIST_CALIB)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert len(message.splitlines()) == 1
        assert "pip install onnxruntime-training-cpu==1.19.2 onnx==1.17.0" in message
        assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------- the ridge search


@pytest.mark.parametrize("minimum", range(8))
def test_the_ridge_search_finds_the_minimum_of_a_unimodal_error(minimum):
    errors = (np.arange(8) - minimum) ** 2 + 1.0
    best, measured = ridge_search(lambda i: errors[i], 8)
    assert best == minimum
    assert 7 in measured  # the strongest ridge (bias only) is always measured
    assert len(measured) < 8


def test_the_ridge_search_measures_fewer_ridges_than_the_grid():
    errors = np.abs(np.arange(8) - 4) + 1.0
    _, measured = ridge_search(lambda i: errors[i], 8)
    assert sorted(measured) == [3, 4, 5, 7]


def test_the_ridge_search_takes_the_strongest_ridge_when_it_is_a_second_minimum():
    errors = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.45, 0.2])  # falls to both ends from the start
    assert ridge_search(lambda i: errors[i], 8)[0] == 7


def test_the_ridge_search_on_a_one_ridge_grid():
    assert ridge_search(lambda i: 1.0, 1) == (0, {0: 1.0})
