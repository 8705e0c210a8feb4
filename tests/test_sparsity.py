"""Weight sparsity: the patterns' masks exactly, the OBS cost and update against brute force, the stage on
Conv, Gemm and MatMul layers, the default model and the CLI."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxprune import PruneConfig, prune
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.loading import load
from onnxprune.ops.base import weighted
from onnxprune.sparsity import check_sparsity, parse_pattern
from onnxprune.sparsity.patterns import Pattern, keep_mask
from onnxprune.quantize import quantize_int8
from onnxprune.runtime import session
from onnxprune.sparsity.solve import allocate, damped, optimal_update, sequential_update, weight_costs
from onnxprune.sparsity.storage import dense_initializers, densified, sparse_form, store_sparse
from tests.builders import run
from test_lowrank import calibration_for, conv_model, gemm_model, matmul_model, mixed_model

MNIST = "models/mnist_resnet.onnx"
MNIST_CALIB = "models/mnist_calib.npz"
MNIST_EVAL = "models/mnist_eval.npz"


# ------------------------------------------------------------------ patterns


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_n_of_m_keeps_exactly_n_in_every_run_and_the_costliest(n, m):
    costs = np.random.default_rng(n * m).random((6, 4 * m))
    keep = keep_mask(costs, Pattern("nm", n, m), 0.0)
    runs, kept = costs.reshape(6, 4, m), keep.reshape(6, 4, m)
    assert (kept.sum(axis=2) == n).all()
    lowest_kept = np.where(kept, runs, np.inf).min(axis=2)
    highest_dropped = np.where(kept, -np.inf, runs).max(axis=2)
    assert (lowest_kept > highest_dropped).all()


@pytest.mark.parametrize("rows, cols", [(4, 1), (2, 3), (1, 8)])
def test_blocks_go_whole_and_the_cheapest_by_summed_cost(rows, cols):
    costs = np.random.default_rng(rows + cols).random((4 * rows, 5 * cols))
    keep = keep_mask(costs, Pattern("block", rows, cols), 0.35)
    blocks = keep.reshape(4, rows, 5, cols)
    assert (blocks.all(axis=(1, 3)) | ~blocks.any(axis=(1, 3))).all()  # every block kept or dropped whole
    kept_blocks = blocks.all(axis=(1, 3))
    assert (~kept_blocks).sum() == round(0.35 * 20)
    sums = costs.reshape(4, rows, 5, cols).sum(axis=(1, 3))
    assert sums[kept_blocks].min() >= sums[~kept_blocks].max()


def test_unstructured_drops_the_share_asked_and_the_cheapest():
    costs = np.random.default_rng(0).random((7, 11))
    keep = keep_mask(costs, Pattern("unstructured"), 0.6)
    assert (~keep).sum() == round(0.6 * 77)
    assert costs[keep].min() >= costs[~keep].max()


def test_allocation_meets_the_budget_under_one_threshold():
    rng = np.random.default_rng(3)
    costs = [rng.random(100) * 3, rng.random(400), rng.random(50) * 0.1]
    fractions = allocate(costs, [1, 1, 1], 0.5, 0.99)
    removed = sum(f * c.size for f, c in zip(fractions, costs))
    assert removed == pytest.approx(0.5 * 550, abs=1)
    assert fractions[2] > fractions[1] > fractions[0]  # the cheap layer gives most


@pytest.mark.parametrize("text, expected", [("unstructured", Pattern("unstructured")), ("2:4", Pattern("nm", 2, 4)),
                                            ("block:4x1", Pattern("block", 4, 1)), (" Block:2X2 ", Pattern("block", 2, 2))])
def test_patterns_parse(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("sparsity, pattern, message", [
    (0.5, "4:2", "--sparsity-pattern '4:2'"), (0.5, "block:1x1", "--sparsity-pattern"), (0.5, "dense", "N:M"),
    (1.0, None, "outside (0, 1)"), (0.0, None, "outside (0, 1)"), (0.6, "2:4", "disagrees"),
    (None, "block:4x1", "needs --sparsity"),
])
def test_bad_sparsity_settings_are_usage_errors(sparsity, pattern, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sparsity(sparsity, pattern, None)


def test_an_unknown_sparsity_method_is_a_usage_error():  # the API's path: the CLI's choice list refuses it first
    with pytest.raises(UsageError, match="--sparsity-method 'random': choose obs or magnitude"):
        check_sparsity(0.5, None, "random")


def test_n_of_m_alone_sets_the_sparsity():
    assert check_sparsity(None, "2:4", None) == (0.5, Pattern("nm", 2, 4))


# ------------------------------------------------------------------ the OBS cost and update


def _layer(seed=0, outputs=5, features=7, samples=300):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((features, features)) * np.linspace(0.2, 2.0, features)  # correlated, scaled
    x = rng.standard_normal((samples, features)) @ mixing
    return rng.standard_normal((outputs, features)), x.T @ x / samples


def _brute_force(weight, keep, h):
    """Each row's kept weights fitted by least squares to the row's output under H (H = L L^T)."""
    root = np.linalg.cholesky(h).T  # ||root v||^2 = v^T H v
    out = np.zeros_like(weight)
    for r in range(len(weight)):
        kept = np.flatnonzero(keep[r])
        out[r, kept] = np.linalg.lstsq(root[:, kept], root @ weight[r], rcond=None)[0]
    return out


def test_optimal_update_matches_least_squares_per_row():
    weight, gram = _layer()
    keep = np.random.default_rng(1).random(weight.shape) > 0.5
    updated = optimal_update(weight, keep, gram)
    assert (updated[~keep] == 0).all()
    np.testing.assert_allclose(updated, _brute_force(weight, keep, damped(gram)), rtol=1e-8, atol=1e-10)


def test_obs_cost_is_the_error_of_removing_one_weight_with_the_update():
    weight, gram = _layer(seed=2)
    h = damped(gram)
    costs = weight_costs(weight, gram) * np.sum((weight @ gram) * weight)  # undo the normalisation
    for r, c in [(0, 0), (2, 3), (4, 6)]:
        keep = np.ones(weight.shape, dtype=bool)
        keep[r, c] = False
        change = _brute_force(weight, keep, h)[r] - weight[r]
        assert costs[r, c] == pytest.approx(change @ h @ change, rel=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_the_update_lowers_every_row_error_of_zeroing_alone(seed):
    weight, gram = _layer(seed=seed, outputs=40)
    keep = np.random.default_rng(seed + 10).random(weight.shape) > 0.3
    h = damped(gram)
    row_errors = lambda new: np.einsum("of,fg,og->o", new - weight, h, new - weight)  # noqa: E731
    assert (row_errors(optimal_update(weight, keep, gram)) <= row_errors(np.where(keep, weight, 0.0)) + 1e-12).all()


def test_sequential_update_is_exact_when_only_the_first_column_goes():
    """SparseGPT's sequential update spreads column j's error over the later columns only: with the first
    column the only one dropped, that is the exact re-fit (the OBS update of one weight)."""
    weight, gram = _layer(seed=5, outputs=6, features=9)
    keep = np.ones(weight.shape, dtype=bool)
    keep[:, 0] = False
    np.testing.assert_allclose(sequential_update(weight, keep, gram, block=4),
                               _brute_force(weight, keep, damped(gram)), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("block", [1, 3, 128])
def test_sequential_update_lies_between_zeroing_and_the_exact_fit(block):
    weight, gram = _layer(seed=6, outputs=30, features=11)
    keep = np.random.default_rng(7).random(weight.shape) > 0.5
    h = damped(gram)
    error = lambda new: float(np.einsum("of,fg,og->", new - weight, h, new - weight))  # noqa: E731
    sequential = sequential_update(weight, keep, gram, block=block)
    assert (sequential[~keep] == 0).all()
    assert error(optimal_update(weight, keep, gram)) < error(sequential) < error(np.where(keep, weight, 0.0))
    np.testing.assert_allclose(sequential, sequential_update(weight, keep, gram, block=2), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the stage


def _weights(model):
    """Every initializer as an array, sparse ones made dense."""
    return dense_initializers(model)


def test_magnitude_zeroes_weights_in_place_through_gemm_alpha_and_transB():
    model = gemm_model(trans_b=1, alpha=0.7)
    result = prune(model, PruneConfig(sparsity=0.5, sparsity_method="magnitude"))
    before = _weights(model)["B"]
    after = _weights(result.model)[result.model.graph.node[0].input[1]]
    assert after.shape == before.shape
    zero = after == 0
    assert zero.sum() == result.report["sparsity"]["zeros"] == before.size // 2
    np.testing.assert_array_equal(after[~zero], before[~zero])
    assert np.abs(before[zero]).max() <= np.abs(before[~zero]).min()


@pytest.mark.parametrize("build, scales", [(lambda: conv_model(pads=[1, 1, 1, 1]), np.linspace(0.1, 3, 8)[:, None, None]),
                                           (lambda: matmul_model(), np.linspace(0.1, 3, 16))])
def test_obs_beats_magnitude_on_inputs_of_unequal_scale(build, scales):
    """Magnitude sees the weights only; OBS weighs them by what their inputs carry (held-out samples)."""
    model = build()
    calibration = calibration_for(model, count=64, scales=scales)
    errors = {}
    for method in ("magnitude", "obs"):
        result = prune(model, PruneConfig(sparsity=0.6, sparsity_method=method, calibration=calibration,
                                          recover="none"))
        assert result.report["sparsity"]["achieved"] == pytest.approx(0.6, abs=0.01)
        errors[method] = result.report["fidelity"]["rel_l2"]
    assert errors["obs"] < 0.7 * errors["magnitude"]


def test_sparsity_alone_removes_no_channel_and_obs_keeps_the_accuracy():
    reports = {}
    for method in ("magnitude", "obs"):
        reports[method] = prune(MNIST, PruneConfig(sparsity=0.5, sparsity_method=method, calibration=MNIST_CALIB,
                                                   evaluation=MNIST_EVAL)).report
    for report in reports.values():
        assert report["after"]["macs"] == report["before"]["macs"]
        assert all(g["channels_after"] == g["channels"] for g in report["groups"] if g["prunable"])
        assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert reports["obs"]["accuracy"]["drop"] <= 0.005
    assert reports["obs"]["fidelity"]["rel_l2"] < 0.5 * reports["magnitude"]["fidelity"]["rel_l2"]


def test_grouped_convs_stay_dense_with_their_reason():
    model = mixed_model()
    report = prune(model, PruneConfig(sparsity=0.5, sparsity_method="magnitude")).report["sparsity"]
    rows = {row["node"]: row for row in report["layers"]}
    assert rows["dw"]["status"] == "skipped" and "group=16" in rows["dw"]["reason"]
    assert rows["conv1"]["status"] == rows["pw"]["status"] == "sparsified"
    assert rows["attention"]["status"] == "skipped"  # no constant weight


def _fused_conv_weights(model) -> dict[str, np.ndarray]:
    weights = _weights(model)
    return {node.name: weights[node.input[1]] for node in model.graph.node
            if node.op_type in ("FusedConv", "Conv") and node.name in ("conv1", "conv2")}


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_fused_convs_kept_by_no_simplify_are_sparsified_as_their_convs(method):
    """onnxruntime's FusedConv (Conv, residual Z and activation in one node) as given: its weight is zeroed as
    the Conv it is spelled out as by default; the result still runs in onnxruntime."""
    from tests.ops.test_fused import fused_conv_residual

    model = fused_conv_residual()
    calibration = {"x": np.random.default_rng(0).standard_normal([20, 3, 16, 16]).astype(np.float32)}
    results = {simplify: prune(model, PruneConfig(sparsity=0.5, sparsity_method=method, calibration=calibration,
                                                  recover="none", simplify=simplify)) for simplify in (False, True)}
    fused = results[False]
    rows = {row["node"]: row for row in fused.report["sparsity"]["layers"]}
    assert [(rows[n]["op"], rows[n]["status"]) for n in ("conv1", "conv2")] == [("FusedConv", "sparsified")] * 2
    assert sorted(n.name for n in fused.model.graph.node if n.op_type == "FusedConv") == ["conv1", "conv2"]
    weights = _fused_conv_weights(fused.model)
    assert all(int((weights[n] == 0).sum()) == rows[n]["zeros"] > 0 for n in weights)
    assert fused.report["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    spelled_out = _fused_conv_weights(results[True].model)
    for name, weight in weights.items():  # the same zeros as the Conv + Add + Relu the rewrite makes of it
        np.testing.assert_array_equal(weight == 0, spelled_out[name] == 0)
        np.testing.assert_allclose(weight, spelled_out[name], rtol=1e-5, atol=1e-6)
    feed = {"x": calibration["x"][:1]}
    pruned_out, original_out = run(fused.model, feed)[0], run(model, feed)[0]
    assert pruned_out.shape == original_out.shape and np.isfinite(pruned_out).all()
    assert fused.report["fidelity"]["cosine"] > 0.8


# ------------------------------------------------------------------ CLI


def test_cli_n_of_m_after_channel_pruning(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    run = CliRunner().invoke(main, [MNIST, str(out), "--filters", "0.25", "--sparsity-pattern", "2:4",
                                    "--calib", MNIST_CALIB, "--calib-samples", "64", "--report", str(report),
                                    "--sparse-index", "smallest"])  # at 50% int64 indices make no tensor smaller
    assert run.exit_code == 0, run.output
    assert "sparsity  " in run.output and "(50.0%, 2:4, obs)" in run.output
    data = json.loads(report.read_text())
    storage = data["sparsity"]["storage"]
    assert out.stat().st_size == storage["stored_bytes"] == data["after"]["size_bytes"] < storage["dense_bytes"]
    assert f"stored {out.stat().st_size:,} B" in run.output and "smallest indices" in run.output
    assert "onnx.checker" in data["checker"]["note"] and data["config"]["sparse_index"] == "smallest"
    assert any(g["channels_after"] < g["channels"] for g in data["groups"] if g["prunable"])
    model = onnx.load(str(out))
    weights = _weights(model)
    for layer in data["sparsity"]["layers"]:
        if layer["status"] != "sparsified":
            continue
        node = next(n for n in model.graph.node if n.name == layer["node"])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = weights[node.input[1]]
        handler, layout = weighted(node.op_type, attrs, w.shape)
        runs = handler.to_matrix(layout, w)[0].T.reshape(-1, 4)  # [outputs, features] in runs of 4
        assert ((runs != 0).sum(axis=1) <= 2).all(), layer["node"]


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity 1.5 is outside"),
    (["--sparsity", "0.5", "--sparsity-pattern", "3:2"], "--sparsity-pattern '3:2'"),
    (["--sparsity-pattern", "2:4", "--steps", "2"], "--sparsity-pattern 2:4 fixes it: use one step"),
    (["--sparsity", "0.5", "--splicing"], "--splicing acts during fine-tuning: give --finetune-steps K"),
    (["--splicing"], "--splicing decides which zeroed weights come back: it needs --sparsity S"),
    (["--sparsity", "0.5", "--sparsity-method", "obs"], "--sparsity-method obs needs --calib data"),
    (["--sparsity-pattern", "3:7"], "no Conv, Gemm or MatMul layer takes the pattern 3:7"),  # found in the model
])
def test_cli_bad_sparsity_options_exit_2(tmp_path, args, message):
    run = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), *args])
    assert run.exit_code == 2, run.output
    assert message in run.output and len(run.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------ sparse storage


def _sparse_weights(model, rng, keep=0.3):
    """`model` with 1 - `keep` of every floating initializer zeroed at random."""
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(np.where(rng.random(values.shape) < keep, values, 0), tensor.name))
    return model


@pytest.mark.parametrize("shape, expected", [((10, 12), ("int8", 1)), ((100, 120, 3), ("int8", 3)),
                                             ((20, 40, 3, 3), ("int16", 1)), ((300, 400), ("int32", 1))])
def test_the_smallest_index_form_is_used_on_request(shape, expected):
    values = np.where(np.random.default_rng(0).random(shape) < 0.2, 1.0, 0.0).astype(np.float32)
    sparse = sparse_form(values, "w", index="smallest")
    indices = numpy_helper.to_array(sparse.indices)
    assert (indices.dtype.name, indices.shape[1] if indices.ndim == 2 else 1) == expected
    assert len(indices) == np.count_nonzero(values)
    linear = numpy_helper.to_array(sparse_form(values, "w").indices)  # the default: int64, linear
    assert linear.dtype == np.int64 and linear.ndim == 1
    np.testing.assert_array_equal(linear, np.flatnonzero(values))


@pytest.mark.parametrize("zeros, index, dense", [(0.3, "smallest", True), (0.6, "smallest", False),
                                                 (0.6, "int64", True), (0.7, "int64", False)])
def test_dense_or_sparse_is_decided_at_the_index_width(zeros, index, dense):
    """40 x 50 float32: 1000 nnz x (4 B + 2 B int16 or 8 B int64) against 8000 B dense."""
    values = np.ones(2000, np.float32)
    values[:int(zeros * 2000)] = 0
    values = np.random.default_rng(0).permutation(values).reshape(40, 50)
    assert (sparse_form(values, "w", index=index) is None) == dense


@pytest.mark.parametrize("index", ["int64", "smallest"])
@pytest.mark.parametrize("build", [lambda: conv_model(c_in=120, c_out=100, kernel=(3,), spatial=(8,)),
                                   lambda: gemm_model(), lambda: matmul_model(k=64, n=96)])
def test_sparse_storage_round_trips_through_onnxruntime_exactly(build, index):
    model = _sparse_weights(build(), np.random.default_rng(1), keep=0.2)
    stored, storage = store_sparse(model, index)
    assert storage["sparse_tensors"] >= 1 and storage["stored_bytes"] < storage["dense_bytes"]
    sparse = [a.sparse_tensor for n in stored.graph.node if n.op_type == "Constant" for a in n.attribute]
    assert len(sparse) == storage["sparse_tensors"]
    index_types = {numpy_helper.to_array(t.indices).dtype.name for t in sparse}
    assert index_types == set(storage["index_types"]) and (index_types == {"int64"}) == (index == "int64")
    if index == "int64":
        onnx.checker.check_model(stored, full_check=True)
    else:
        with pytest.raises(onnx.checker.ValidationError, match="INT64"):
            onnx.checker.check_model(stored)
    feed = {name: x for name, x in calibration_for(model, count=4).arrays.items()}
    dense_out = session(model).run(None, feed)
    sparse_out = session(stored).run(None, feed)
    for a, b in zip(dense_out, sparse_out):
        np.testing.assert_array_equal(a, b)
    weights = dense_initializers(stored)
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(weights[tensor.name], numpy_helper.to_array(tensor))
    again = densified(stored)
    assert {n.op_type for n in again.graph.node} == {n.op_type for n in model.graph.node}
    assert store_sparse(again, index)[1]["stored_bytes"] == storage["stored_bytes"]


def test_cli_default_sparse_output_passes_the_full_onnx_checker(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    run = CliRunner().invoke(main, [MNIST, str(out), "--sparsity", "0.9", "--sparsity-method", "magnitude",
                                    "--report", str(report)])
    assert run.exit_code == 0, run.output
    data = json.loads(report.read_text())
    storage = data["sparsity"]["storage"]
    assert storage["index"] == "int64" and storage["index_types"] == ["int64"] and storage["sparse_tensors"] >= 3
    assert out.stat().st_size == storage["stored_bytes"] < storage["dense_bytes"]
    assert data["checker"] == {"passed": True}
    onnx.checker.check_model(str(out), full_check=True)


def test_cli_sparse_index_without_sparsity_exits_2(tmp_path):
    run = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), "--sparse-index", "smallest"])
    assert run.exit_code == 2 and "--sparse-index smallest says how zeroed weights are stored" in run.output


# ------------------------------------------------------------------ the int8 hand-off


def test_cli_quantize_writes_the_validated_int8_model_beside_the_pruned_figures(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    run = CliRunner().invoke(main, [MNIST, str(out), "--filters", "0.5", "--quantize", "int8", "--calib", MNIST_CALIB,
                                    "--eval", MNIST_EVAL, "--report", str(report)])
    assert run.exit_code == 0, run.output
    data = json.loads(report.read_text())
    model = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    alone = data["quantize"]["pruned_only"]
    assert out.stat().st_size == data["after"]["size_bytes"] < 0.6 * alone["size_bytes"]
    assert data["accuracy"]["after"] >= alone["accuracy"] - 0.01  # int8 costs at most a point here
    assert data["fidelity"]["cosine"] != alone["fidelity"]["cosine"]  # measured on the quantized model
    feed = {"input": np.load(MNIST_EVAL)["input"][:100]}
    labels = np.load(MNIST_EVAL)["labels"][:100]
    accuracy = float((session(out).run(None, feed)[0].argmax(1) == labels).mean())
    assert accuracy >= 0.9
    assert "pruned only: size" in run.output and "quantized:   size" in run.output


def test_a_sparse_int8_model_round_trips_exactly():
    model = _sparse_weights(matmul_model(k=64, n=96), np.random.default_rng(2), keep=0.1)
    calibration = calibration_for(model, count=16)
    quantized, _ = quantize_int8(model, calibration, 8)
    stored, storage = store_sparse(quantized)
    sparse = [a.sparse_tensor for n in stored.graph.node if n.op_type == "Constant" for a in n.attribute]
    assert "int8" in {numpy_helper.to_array(t.values).dtype.name for t in sparse}
    assert storage["stored_bytes"] < storage["dense_bytes"]
    feed = calibration.arrays
    for a, b in zip(session(quantized).run(None, feed), session(stored).run(None, feed)):
        np.testing.assert_array_equal(a, b)


def test_cli_quantized_output_is_gated(tmp_path):
    out = tmp_path / "out.onnx"
    run = CliRunner().invoke(main, [MNIST, str(out), "--filters", "0.25", "--quantize", "int8", "--calib", MNIST_CALIB,
                                    "--calib-samples", "64", "--scorer", "l1", "--min-cosine", "0.99999"])
    assert run.exit_code == 1, run.output
    assert "validation failed" in run.output and not out.exists()


def test_cli_quantize_exclude_leaves_the_nodes_float_and_the_report_names_the_worst(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    run = CliRunner().invoke(main, [MNIST, str(out), "--filters", "0.25", "--quantize", "int8", "--calib", MNIST_CALIB,
                                    "--calib-samples", "64", "--scorer", "l1", "--quantize-exclude", "/layer3/*",
                                    "--report", str(report)])
    assert run.exit_code == 0, run.output
    quantize = json.loads(report.read_text())["quantize"]
    assert quantize["excluded_nodes"] and all(n.startswith("/layer3/") for n in quantize["excluded_nodes"])
    model = onnx.load(str(out))
    produced = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:  # the excluded convs read a float weight, not a DequantizeLinear's output
        if node.name.startswith("/layer3/") and node.op_type == "Conv":
            assert produced.get(node.input[1]) is None or produced[node.input[1]].op_type != "DequantizeLinear"
        elif node.op_type == "Conv":
            assert produced[node.input[1]].op_type == "DequantizeLinear"
    worst = quantize["worst_layers"]
    assert 1 <= len(worst) <= 5 and [w["sqnr_db"] for w in worst] == sorted(w["sqnr_db"] for w in worst)
    assert all(w["node"] for w in worst) and "most lost:" in run.output


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "--quantize needs --calib"),
    (["--quantize-exclude", "/fc/*"], "--quantize-exclude names nodes to leave float in --quantize int8"),
    (["--filters", "0.25", "--scorer", "l1", "--calib-samples", "64", "--quantize", "int8", "--calib", MNIST_CALIB,
      "--quantize-exclude", "nosuchnode"],
     "--quantize-exclude 'nosuchnode' matches no node"),
    (["--quantize", "int4"], "'int4' is not"),
])
def test_cli_bad_quantize_options_exit_2(tmp_path, args, message):
    run = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), *args])
    assert run.exit_code == 2, run.output
    assert message in run.output
    assert not (tmp_path / "out.onnx").exists()


def test_cli_quantization_onnxruntime_refuses_exits_3(tmp_path, monkeypatch):
    import onnxruntime.quantization

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported op\ndetails")
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", refuse)
    out = tmp_path / "out.onnx"
    run = CliRunner().invoke(main, [MNIST, str(out), "--filters", "0.25", "--quantize", "int8", "--calib", MNIST_CALIB,
                                    "--calib-samples", "64", "--scorer", "l1"])
    assert run.exit_code == 3, run.output
    assert "onnxruntime's quantization failed (Unsupported op): run without --quantize" in run.output
    assert len(run.output.strip().splitlines()) == 1 and not out.exists()


def test_the_weights_before_are_kept_only_when_asked():
    """Splicing's start (the dense weights) is a copy of every sparsified weight: only with keep_dense."""
    from onnxprune.calib import CalibrationSet
    from onnxprune.sparsity import SparsitySettings, sparsify_model

    model = gemm_model(trans_b=1, alpha=0.7)
    data = CalibrationSet({"x": np.zeros((2, 8), np.float32)})
    settings = SparsitySettings(0.5, method="magnitude")
    plain, kept = (sparsify_model(model, {"x": [2, 8]}, data, settings, keep_dense=keep) for keep in (False, True))
    assert plain.dense == {} and plain.sparsified == kept.sparsified == tuple(kept.dense) != ()
    np.testing.assert_array_equal(kept.dense[kept.sparsified[0]], _weights(model)["B"])


def test_cli_quantize_exclude_matching_no_node_is_refused_before_any_work(tmp_path, monkeypatch):
    import onnxprune.baseline
    monkeypatch.setattr(onnxprune.baseline.Baseline, "reference", lambda self: pytest.fail("calibration ran"))
    run = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), "--filters", "0.25", "--quantize", "int8",
                                    "--calib", MNIST_CALIB, "--quantize-exclude", "nosuchnode"])
    assert run.exit_code == 2 and "--quantize-exclude 'nosuchnode' matches no node" in run.output, run.output


def test_a_small_tensor_stays_dense_when_its_constant_node_costs_more():
    """An all-zero zero point of 4 bytes is 'smaller sparse' by its values, not with the node's names."""
    model = _sparse_weights(matmul_model(k=64, n=96), np.random.default_rng(3), keep=0.1)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.int8), "a_zero_point"))
    stored, storage = store_sparse(model)
    assert "w1" in {n.output[0] for n in stored.graph.node if n.op_type == "Constant"}
    assert "a_zero_point" in {t.name for t in stored.graph.initializer}


@pytest.mark.parametrize("index", ["int64", "smallest"])
def test_a_stored_sparse_model_loads_with_its_weights_dense_and_prunes_again(tmp_path, index):
    """onnxprune's own sparse output as an input: its Constant sparse_value nodes are folded into dense
    initializers equal to the weights before storing, and the model prunes like any other."""
    model = _sparse_weights(matmul_model(k=64, n=96), np.random.default_rng(5), keep=0.1)
    stored, _ = store_sparse(model, index)
    assert any(a.name == "sparse_value" for n in stored.graph.node for a in n.attribute)
    path = tmp_path / "sparse.onnx"
    onnx.save(stored, str(path))
    loaded = load(path).model
    assert not [n for n in loaded.graph.node if n.op_type == "Constant"]
    weights = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    for name, values in dense_initializers(model).items():
        np.testing.assert_array_equal(weights[name], values)
    run = CliRunner().invoke(main, [str(path), str(tmp_path / "out.onnx"), "--filters", "0.5", "--round-to", "1"])
    assert run.exit_code == 0, run.output


def test_a_sparse_constant_with_indices_outside_its_dims_is_a_one_line_model_error(tmp_path):
    model = _sparse_weights(matmul_model(k=64, n=96), np.random.default_rng(5), keep=0.1)
    stored, _ = store_sparse(model)
    sparse = next(a.sparse_tensor for n in stored.graph.node for a in n.attribute if a.name == "sparse_value")
    indices = numpy_helper.to_array(sparse.indices).copy()
    indices[0] = -1
    sparse.indices.CopyFrom(numpy_helper.from_array(indices, sparse.indices.name))
    path = tmp_path / "corrupt.onnx"
    onnx.save(stored, str(path))
    run = CliRunner().invoke(main, [str(path), str(tmp_path / "out.onnx"), "--filters", "0.5"])
    assert run.exit_code == 3 and "indices do not fit its dims" in run.output, run.output


def test_cli_a_stored_sparse_model_failing_the_checker_is_a_bug_and_writes_nothing(tmp_path, monkeypatch):
    """With int64 indices the stored file is checked again: a failure there is ours (exit 4), nothing written."""
    import onnxprune.stages

    def broken(model, index="int64"):
        stored, storage = store_sparse(model, index)
        stored.graph.node[0].input.append("no_such_tensor")
        return stored, storage
    monkeypatch.setattr(onnxprune.stages, "store_sparse", broken)
    out = tmp_path / "out.onnx"
    run = CliRunner().invoke(main, [MNIST, str(out), "--sparsity", "0.9", "--sparsity-method", "magnitude"])
    assert run.exit_code == 4 and "fails the ONNX checker" in run.output, run.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
