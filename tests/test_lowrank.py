"""Low-rank factorization: exactness at full and true rank, factor shapes and attributes, im2col
statistics, data-aware factors, rank selection, skipped layers, plans and the CLI."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from models import make_model
from onnxprune import PruneConfig, prune
from onnxprune.calib import CalibrationSet
from onnxprune.cli import main
from onnxprune.errors import NothingToPrune, UsageError
from onnxprune.lowrank.covariance import PatchSampler
from onnxprune.lowrank.decompose import decompose, relative_error
from onnxprune.lowrank.layers import find_layers
from onnxprune.lowrank.rank import Options, by_budget
from onnxprune.loading import load
from onnxprune.plan import LowRankPlan, Plan
from onnxprune.runtime import session

MNIST = "models/mnist_resnet.onnx"
MNIST_CALIB = "models/mnist_calib.npz"


# ------------------------------------------------------------------ small models


def _init(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def conv_model(c_in=8, c_out=12, kernel=(3, 3), spatial=(9, 9), weight=None, seed=0, **attrs):
    """x [N, c_in, *spatial] -> Conv(attrs, bias) -> y."""
    rng = np.random.default_rng(seed)
    w = weight if weight is not None else rng.standard_normal((c_out, c_in, *kernel)) / np.sqrt(c_in * np.prod(kernel))
    inits = [_init("w", w), _init("b", rng.standard_normal(c_out) * 0.1)]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=list(kernel), **attrs)
    return make_model([node], [("x", ["N", c_in, *spatial])], ["y"], inits)


def matmul_model(k=16, n=24, weight=None, seed=0):
    """Batched transformer-style x [N, 6, k] -> MatMul W[k, n] -> Add bias -> Relu -> MatMul [n, 5] -> y."""
    rng = np.random.default_rng(seed)
    w = weight if weight is not None else rng.standard_normal((k, n)) / np.sqrt(k)
    inits = [_init("w1", w), _init("b1", rng.standard_normal(n) * 0.1), _init("w2", rng.standard_normal((n, 5)) / np.sqrt(n))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu1"),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", 6, k])], ["y"], inits)


def gemm_model(trans_a=0, trans_b=1, alpha=0.7, beta=1.3, k=8, n=20, m=5, seed=0):
    """Gemm(x, B, C) with every attribute set; with transA the input is [k, m] (fixed batch)."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)
    inits = [_init("B", b), _init("C", rng.standard_normal((1, n)))]
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    shape = [k, m] if trans_a else ["N", k]
    return make_model([node], [("x", shape)], ["y"], inits)


def mixed_model(seed=0):
    """conv 3x3 (8->16) -> depthwise 3x3 -> 1x1 (16->16) -> y, plus an attention-style MatMul of two tensors."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.standard_normal((16, 8, 3, 3)) * 0.1), _init("wd", rng.standard_normal((16, 1, 3, 3)) * 0.3),
             _init("w2", rng.standard_normal((16, 16, 1, 1)) * 0.25)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "wd"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="pw", kernel_shape=[1, 1]),
             helper.make_node("MatMul", ["y", "d"], ["scores"], name="attention")]
    return make_model(nodes, [("x", ["N", 8, 6, 6])], ["y", "scores"], inits)


def calibration_for(model, count=24, seed=1, scales=None) -> CalibrationSet:
    """Real (not synthetic) data for every float input: data-aware factors are used."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else count for d in value.type.tensor_type.shape.dim]
        x = rng.standard_normal(dims)
        arrays[value.name] = (x * scales if scales is not None else x).astype(np.float32)
    return CalibrationSet(arrays)


def candidates(model):
    loaded = load(model)
    return [layer for layer in find_layers(gs.import_onnx(loaded.model), loaded.shapes) if not layer.reason]


def factorize(model, ranks=None, subspaces=1, calibration=None):
    """Factorize every candidate at the given rank per layer name (default: full rank) through a plan."""
    entries = [LowRankPlan(layer.name, (ranks or {}).get(layer.name, layer.full_rank(subspaces)), subspaces)
               for layer in candidates(model)]
    return prune(model, PruneConfig(plan=Plan(lowrank=entries), calibration=calibration))


def assert_exact(result, tolerance=1e-4):
    for name, fid in result.report["fidelity"]["per_output"].items():
        assert fid["rel_l2"] < tolerance, (name, fid)


def nodes_of(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def weight(model, node, index=1):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[node.input[index]]


EXACT_MODELS = {
    "conv3x3": lambda: conv_model(pads=[1, 1, 1, 1]),
    "conv_strided_dilated": lambda: conv_model(strides=[2, 2], pads=[2, 1, 2, 1], dilations=[2, 2], spatial=(11, 10)),
    "conv_same_upper": lambda: conv_model(strides=[2, 2], auto_pad="SAME_UPPER", spatial=(9, 8)),
    "conv1d": lambda: conv_model(c_in=4, c_out=10, kernel=(5,), spatial=(32,), strides=[2], dilations=[2], pads=[3, 1]),
    "matmul_batched": lambda: matmul_model(),
    "gemm": lambda: gemm_model(),
    "gemm_transA": lambda: gemm_model(trans_a=1, trans_b=0),
}


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("name", sorted(EXACT_MODELS))
@pytest.mark.parametrize("data_aware", [False, True])
def test_full_rank_reproduces_outputs(name, data_aware):
    model = EXACT_MODELS[name]()
    result = factorize(model, calibration=calibration_for(model) if data_aware else None)
    layers = result.report["lowrank"]["layers"]
    assert result.report["lowrank"]["data_aware"] is data_aware
    assert result.report["lowrank"]["factorized"] == len(candidates(model)) >= 1
    assert len(result.model.graph.node) == len(model.graph.node) + len(result.plan.lowrank)
    assert all(layer["rel_error"] < 1e-6 for layer in layers if layer["status"] == "factorized")
    assert_exact(result)


@pytest.mark.parametrize("subspaces", [2, 4])
def test_full_rank_with_input_subspaces_is_exact(subspaces):
    model = conv_model(pads=[1, 1, 1, 1], strides=[2, 2])
    result = factorize(model, subspaces=subspaces, calibration=calibration_for(model))
    first = nodes_of(result.model, "Conv")[0]
    assert attrs(first)["group"] == subspaces
    assert_exact(result)


def test_true_rank_matmul_factorizes_exactly_at_that_rank():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 3)) @ rng.standard_normal((3, 24))
    model = matmul_model(weight=w)
    result = prune(model, PruneConfig(rank="auto", lowrank_error=1e-6))
    fc1 = next(layer for layer in result.report["lowrank"]["layers"] if layer["node"] == "fc1")
    assert (fc1["status"], fc1["rank"]) == ("factorized", 3)
    assert_exact(result)


def test_true_rank_conv_factorizes_exactly_at_that_rank():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((12, 4)) @ rng.standard_normal((4, 8 * 9))).reshape(12, 8, 3, 3) / 10
    model = conv_model(weight=w, pads=[1, 1, 1, 1])
    result = prune(model, PruneConfig(rank="auto", lowrank_error=1e-6))
    (layer,) = result.report["lowrank"]["layers"]
    assert (layer["status"], layer["rank"], layer["subspaces"]) == ("factorized", 4, 1)
    assert_exact(result)
    dec = decompose(w.reshape(12, -1).T)
    assert dec.errors[4] < 1e-6 < dec.errors[3]


# ------------------------------------------------------------------ factor nodes


def test_conv_factors_carry_geometry_on_the_first_node():
    model = conv_model(c_in=8, c_out=12, strides=[2, 2], pads=[2, 1, 2, 1], dilations=[2, 2], spatial=(11, 10))
    result = factorize(model, {"conv": 3}, subspaces=2)
    first, second = nodes_of(result.model, "Conv")
    assert first.input[0] == "x" and second.output[0] == "y" and second.input[0] == first.output[0]
    assert weight(result.model, first).shape == (2 * 3, 8 // 2, 3, 3)
    assert weight(result.model, second).shape == (12, 2 * 3, 1, 1)
    a1, a2 = attrs(first), attrs(second)
    assert (a1["strides"], a1["pads"], a1["dilations"], a1["group"]) == ([2, 2], [2, 1, 2, 1], [2, 2], 2)
    assert a1["kernel_shape"] == [3, 3] and a2["kernel_shape"] == [1, 1]
    assert not {"strides", "pads", "dilations", "auto_pad"} & set(a2) and a2.get("group", 1) == 1
    assert len(first.input) == 2 and second.input[2] == "b"  # bias on the second factor only


def test_conv_auto_pad_stays_on_the_first_node():
    model = conv_model(strides=[2, 2], auto_pad="SAME_UPPER", spatial=(9, 8))
    result = factorize(model, {"conv": 2})
    first, second = nodes_of(result.model, "Conv")
    assert attrs(first)["auto_pad"] == b"SAME_UPPER" or attrs(first)["auto_pad"] == "SAME_UPPER"
    assert "auto_pad" not in attrs(second)


def test_gemm_factors_keep_trans_a_alpha_beta_and_bias():
    model = gemm_model(trans_a=1, trans_b=1, alpha=0.7, beta=1.3)
    result = factorize(model, {"gemm": 4})
    first, second = nodes_of(result.model, "Gemm")
    a1, a2 = attrs(first), attrs(second)
    assert a1["transA"] == 1 and a1.get("transB", 0) == 0 and a1.get("alpha", 1.0) == 1.0 and len(first.input) == 2
    assert a2.get("transA", 0) == 0 and a2["beta"] == pytest.approx(1.3) and second.input[2] == "C"
    assert weight(result.model, first).shape == (8, 4) and weight(result.model, second).shape == (4, 20)
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "B"))
    product = weight(result.model, first) @ weight(result.model, second)
    assert np.linalg.matrix_rank(product, tol=1e-5) == 4
    assert np.linalg.norm(product - 0.7 * b.T) < np.linalg.norm(0.7 * b.T)  # alpha folded into the factors


def test_matmul_factors_on_batched_input():
    model = matmul_model(k=16, n=24)
    result = factorize(model, {"fc1": 5, "fc2": 2})
    fc1a, fc1b, fc2a, fc2b = nodes_of(result.model, "MatMul")
    assert weight(result.model, fc1a).shape == (16, 5) and weight(result.model, fc1b).shape == (5, 24)
    assert weight(result.model, fc2a).shape == (24, 2) and weight(result.model, fc2b).shape == (2, 5)
    out = session(result.model).run(None, {"x": np.ones((3, 6, 16), np.float32)})[0]
    assert out.shape == (3, 6, 5)


# ------------------------------------------------------------------ statistics and data-aware factors


@pytest.mark.parametrize("kwargs", [
    dict(strides=[2, 2], pads=[2, 1, 0, 1], dilations=[2, 1], spatial=(11, 10)),
    dict(strides=[2, 2], auto_pad="SAME_LOWER", spatial=(9, 8)),
    dict(c_in=4, kernel=(5,), spatial=(32,), strides=[2], dilations=[2], pads=[3, 1]),
])
def test_patch_sampler_rows_reproduce_the_conv(kwargs):
    """im2col rows times the weight matrix are the conv's outputs at the sampled positions."""
    model = conv_model(**kwargs)
    loaded = load(model)
    (layer,) = candidates(model)
    sampler = PatchSampler(layer, loaded.shapes["x"], np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, *loaded.shapes["x"][1:])).astype(np.float32)
    y = session(model).run(None, {"x": x})[0]
    bias = numpy_helper.to_array(model.graph.initializer[1])
    rows = sampler.patches(x) @ layer.weight + bias  # [2 * P, c_out]
    dims = len(loaded.shapes["x"]) - 2
    positions = np.unravel_index(sampler.chosen, sampler.out)
    expected = y[(slice(None), slice(None), *positions)]  # [2, c_out, P]
    assert dims == len(positions)
    np.testing.assert_allclose(rows.reshape(2, -1, rows.shape[1]), np.moveaxis(expected, 1, 2), rtol=1e-4, atol=1e-4)


def test_data_aware_factors_lower_the_error_on_the_data():
    rng = np.random.default_rng(5)
    scales = np.geomspace(0.01, 3.0, 32)
    x = rng.standard_normal((2000, 32)) * scales
    covariance = x.T @ x / len(x)
    w = rng.standard_normal((32, 40))
    plain, weighted = decompose(w), decompose(w, covariance)
    for rank in (4, 8, 16):
        on_data_plain = relative_error(w, plain.approximation(rank), covariance)
        on_data_weighted = relative_error(w, weighted.approximation(rank), covariance)
        assert on_data_weighted < 0.8 * on_data_plain


def test_data_aware_factors_through_the_pipeline():
    scales = np.geomspace(0.05, 3.0, 16).reshape(1, 1, 16)
    model = matmul_model(k=16, n=24)
    data = calibration_for(model, count=64, scales=scales)
    synthetic_like = CalibrationSet(data.arrays, source="synthetic")
    weighted = prune(model, PruneConfig(rank=0.25, calibration=data))
    plain = prune(model, PruneConfig(rank=0.25, calibration=synthetic_like))
    assert weighted.report["lowrank"]["data_aware"] and not plain.report["lowrank"]["data_aware"]
    assert weighted.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]


# ------------------------------------------------------------------ rank selection


def _options(seed=0):
    model = conv_model(c_in=8, c_out=16, pads=[1, 1, 1, 1], seed=seed)
    (layer,) = candidates(model)
    return Options.of(layer, {j: decompose(layer.weight, None, j) for j in layer.subspace_options})


def test_budget_meets_the_saving_with_the_smallest_worst_error():
    options = [_options(seed) for seed in range(3)]
    for o, name in zip(options, "abc"):
        o.layer.name = name
    dense = sum(o.layer.macs() for o in options)
    for needed in (int(0.1 * dense), int(0.4 * dense)):
        chosen, level = by_budget(options, needed)
        saved = sum(o.layer.macs() - o.layer.macs(c.rank, c.subspaces) for o in options if (c := chosen.get(o.layer.name)))
        assert saved >= needed
        assert all(c.error <= level for c in chosen.values())
        lower = [e for e in np.unique(np.concatenate([o.errors for o in options])) if e < level]
        if lower:  # one error level lower no longer saves enough: the worst error is minimal
            cheaper = sum(o.layer.macs() - o.layer.macs(c.rank, c.subspaces) for o in options
                          if (c := o.best_within(lower[-1])) is not None)
            assert cheaper < needed


def test_target_macs_is_met_on_the_default_model():
    calibration = CalibrationSet({"input": np.load(MNIST_CALIB)["input"][:64]})
    result = prune(MNIST, PruneConfig(rank="auto", target_macs=0.6, calibration=calibration, recover="none"))
    report = result.report
    assert report["after"]["macs"] <= 0.6 * report["before"]["macs"]
    assert report["lowrank"]["mode"] == "budget" and report["lowrank"]["reached"]
    assert report["lowrank"]["data_aware"]
    assert report["fidelity"]["top1_agreement"] > 0.8


def test_rank_auto_keeps_each_layer_within_the_error():
    result = prune(MNIST, PruneConfig(rank="auto", lowrank_error=0.3))
    done = [layer for layer in result.report["lowrank"]["layers"] if layer["status"] == "factorized"]
    assert done
    assert all(layer["rel_error"] <= 0.3 + 1e-9 for layer in done if layer["subspaces"] == 1)


def test_layers_are_factorized_only_when_macs_and_params_go_down():
    result = prune(mixed_model(), PruneConfig(rank=0.5))
    layers = {layer["node"]: layer for layer in result.report["lowrank"]["layers"]}
    assert layers["conv1"]["status"] == "factorized"
    assert layers["conv1"]["macs_after"] < layers["conv1"]["macs_before"]
    assert layers["conv1"]["params_after"] < layers["conv1"]["params_before"]
    assert layers["dw"]["status"] == "skipped" and "depthwise" in layers["dw"]["reason"]
    assert layers["pw"]["status"] == "skipped" and "does not lower MACs and params" in layers["pw"]["reason"]
    assert layers["attention"]["status"] == "skipped" and "no constant weight" in layers["attention"]["reason"]


def test_exclude_leaves_layers_whole():
    result = prune(mixed_model(), PruneConfig(rank=0.5, exclude=("p?",)))
    layers = {layer["node"]: layer for layer in result.report["lowrank"]["layers"]}
    assert layers["pw"]["reason"] == "excluded by --exclude p?" and layers["conv1"]["status"] == "factorized"
    with pytest.raises(NothingToPrune, match="nothing to factorize"):
        prune(mixed_model(), PruneConfig(rank=0.5, exclude=("conv*",)))


def test_filters_then_rank_on_the_default_model():
    calibration = CalibrationSet({"input": np.load(MNIST_CALIB)["input"][:64]})
    fast = dict(calibration=calibration, scorer="l1", recover="none")
    both = prune(MNIST, PruneConfig(filters=0.3, rank=0.5, **fast))
    filters = prune(MNIST, PruneConfig(filters=0.3, **fast))
    lowrank = prune(MNIST, PruneConfig(rank=0.5, **fast))
    assert both.report["after"]["macs"] < min(filters.report["after"]["macs"], lowrank.report["after"]["macs"])
    assert both.plan.lowrank and any(len(g.keep) < g.channels for g in both.plan.groups)
    assert not any(len(g.keep) < g.channels for g in lowrank.plan.groups)  # --rank alone: no filters removed
    assert both.report["config"]["filters"] == 0.3 and lowrank.report["config"]["filters"] == 0.0


def test_factorize_api_removes_no_channel():
    import onnxprune

    result = onnxprune.factorize(mixed_model(), rank=0.5)
    assert result.report["lowrank"]["factorized"] == 1 and result.report["config"]["filters"] == 0.0
    assert all(g["channels_after"] == g["channels"] for g in result.report["groups"] if g["prunable"])


def test_bad_rank_settings_are_usage_errors():
    with pytest.raises(UsageError, match="--rank"):
        prune(MNIST, PruneConfig(rank=1.5))
    with pytest.raises(UsageError, match="--rank auto"):
        prune(MNIST, PruneConfig(rank=0.5, target_macs=0.5))
    wrong = Plan(lowrank=[LowRankPlan("/no/such/Conv", 2)])
    with pytest.raises(UsageError, match="plan"):
        prune(MNIST, PruneConfig(plan=wrong))


def test_plan_round_trips_with_ranks():
    plan = Plan(lowrank=[LowRankPlan("conv", 3, 2), LowRankPlan("fc", 5)])
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.lowrank[0].subspaces == 2
    assert Plan.from_json(json.dumps({"groups": [], "version": 1})).lowrank == []


# ------------------------------------------------------------------ CLI


def test_cli_rank_alone_writes_report_and_plan(tmp_path):
    out, report, plan = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "plan.json"
    run = CliRunner().invoke(main, [MNIST, str(out), "--rank", "0.5", "--report", str(report), "--plan-out", str(plan)])
    assert run.exit_code == 0, run.output
    assert "low-rank  10 of 10 layers factorized" in run.output
    data = json.loads(report.read_text())
    assert data["lowrank"]["factorized"] == 10 and data["config"]["filters"] == 0.0
    assert all(g["channels_after"] == g["channels"] for g in data["groups"] if g["prunable"])
    assert data["after"]["macs"] < data["before"]["macs"]
    onnx.checker.check_model(str(out), full_check=True)
    again = tmp_path / "again.onnx"
    rerun = CliRunner().invoke(main, [MNIST, str(again), "--plan-in", str(plan)])
    assert rerun.exit_code == 0, rerun.output
    assert again.read_bytes() == out.read_bytes()


def test_cli_filters_and_rank_auto_with_target(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    run = CliRunner().invoke(main, [MNIST, str(out), "--filters", "0.25", "--rank", "auto", "--target-macs", "0.5",
                                    "--calib", MNIST_CALIB, "--calib-samples", "64", "--scorer", "l1",
                                    "--recover", "none", "--report", str(report)])
    assert run.exit_code == 0, run.output
    data = json.loads(report.read_text())
    assert data["after"]["macs"] <= 0.5 * data["before"]["macs"]
    assert data["lowrank"]["mode"] == "budget" and data["lowrank"]["data_aware"]
    assert any(g["channels_after"] < g["channels"] for g in data["groups"] if g["prunable"])


@pytest.mark.parametrize("args, message", [
    (["--rank", "half"], "--rank"),
    (["--rank", "0.5", "--target-macs", "0.5"], "--rank auto"),
    (["--rank", "auto", "--lowrank-error", "0"], "--lowrank-error"),
])
def test_cli_bad_rank_options_exit_2(tmp_path, args, message):
    run = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), *args])
    assert run.exit_code == 2, run.output
    assert message in run.output
    assert not (tmp_path / "out.onnx").exists()


def test_cli_nothing_to_factorize_exits_3(tmp_path):
    run = CliRunner().invoke(main, [MNIST, str(tmp_path / "out.onnx"), "--rank", "auto", "--lowrank-error", "0.001"])
    assert run.exit_code == 3, run.output
    assert "nothing to factorize" in run.output
