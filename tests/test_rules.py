"""ops/rules: the exact rewrites applied when a model is loaded (affine arithmetic folded into the Conv
before or after it, a written-out hard swish made one or two ops), each checked against onnxruntime on
the model before and after, the cases each rule must leave alone, and how loading, the report and the CLI
carry them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune import PruneConfig, prune
from onnxprune.calib import CalibrationSet
from onnxprune.loading import load
from onnxprune.ops.rules import simplify_model
from tests.builders import Builder, random_input, run, x_input


def check_rewrite(model: onnx.ModelProto, counts: dict, after_ops: list[str] | None = None) -> onnx.ModelProto:
    """The rules rewrite `model` `counts` times into `after_ops` (or leave it as it is) with the same outputs."""
    after, found = simplify_model(model)
    assert found == counts
    assert ops(after) == (after_ops if after_ops is not None else ops(model))
    assert_same_outputs(model, after)
    return after


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    feed = random_input(before, seed=1)
    for a, b in zip(run(before, feed), run(after, feed)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def affine_chain(reader_twice: bool = False, constant_first: bool = True, spatial: bool = False) -> onnx.ModelProto:
    """conv1(3->8) -> Mul(s, .) -> Add(., b) -> Sub(., c) -> Div(., d) -> Relu -> conv2(8->4), the
    constants per channel ([8, 1, 1], a scalar for Sub) as paddle2onnx writes them (the scale first)."""
    b = Builder(seed=3)
    h = b.conv("conv1", "x", 3, 8)
    scale = b.const("s", b.rng.uniform(-2, 2, [1, 16, 1] if spatial else [8, 1, 1]))
    mul = b.node("Mul", "mul", [scale, h] if constant_first else [h, scale])
    add = b.node("Add", "add", [mul, b.const("b", b.rng.standard_normal([8, 1, 1]))])
    sub = b.node("Sub", "sub", [add, b.const("c", 0.3)])
    div = b.node("Div", "div", [sub, b.const("d", b.rng.uniform(0.5, 2, [1, 8, 1, 1]))])
    out = b.relu("relu", div)
    if reader_twice:  # the Add's output read by a second node: the chain stops before it
        out = b.node("Add", "join", [out, b.node("Sigmoid", "gate", [add])])
    b.output(b.conv("conv2", out, 8, 4))
    return b.model(x_input())


def hard_swish(opset: int = 12, divide_first: bool = False, clip_read_twice: bool = False) -> onnx.ModelProto:
    """conv1 -> paddle2onnx's hard swish (x + 3, Clip 0..6, x * ., / 6; or / 6 before the product) -> conv2."""
    b = Builder(seed=4, opset=opset)
    x = b.conv("conv1", "x", 3, 8)
    shifted = b.node("Add", "add3", [x, b.const("three", 3.0)])
    gate = b.node("Clip", "clip", [shifted, b.const("zero", 0.0), b.const("six", 6.0)])
    if divide_first:
        out = b.node("Mul", "mul", [x, b.node("Div", "div", [gate, "six"])])
    else:
        out = b.node("Div", "div", [b.node("Mul", "mul", [x, gate]), "six"])
    if clip_read_twice:
        out = b.node("Add", "join", [out, gate])
    b.output(b.conv("conv2", out, 8, 4))
    return b.model(x_input(), opset=opset)


def test_affine_chain_folds_into_the_conv():
    check_rewrite(affine_chain(), {"affine_into_conv": 4}, ["Conv", "Relu", "Conv"])


def test_affine_with_the_constant_second_folds_too():
    check_rewrite(affine_chain(constant_first=False), {"affine_into_conv": 4}, ["Conv", "Relu", "Conv"])


def test_affine_stops_where_a_tensor_has_another_reader():
    check_rewrite(affine_chain(reader_twice=True), {"affine_into_conv": 2},  # the Add's output is read twice
                  ["Conv", "Sub", "Sigmoid", "Div", "Relu", "Add", "Conv"])


def test_a_constant_varying_over_space_is_not_folded():
    check_rewrite(affine_chain(spatial=True), {})


@pytest.mark.parametrize("divide_first", [False, True])
def test_hard_swish_before_opset_14_becomes_hard_sigmoid_and_mul(divide_first):
    check_rewrite(hard_swish(divide_first=divide_first), {"hard_swish": 1}, ["Conv", "HardSigmoid", "Mul", "Conv"])


def test_hard_swish_from_opset_14_is_one_op():
    check_rewrite(hard_swish(opset=14), {"hard_swish": 1}, ["Conv", "HardSwish", "Conv"])


def test_hard_swish_whose_gate_is_read_elsewhere_is_left():
    check_rewrite(hard_swish(clip_read_twice=True), {})


def test_prune_reports_the_rewrites_and_no_simplify_keeps_the_ops():
    model = hard_swish()
    result = prune(model, PruneConfig(filters=0.5, scorer="l1", round_to=1))
    assert result.report["simplified"] == {"hard_swish": 1}
    assert "HardSigmoid" in ops(result.model) and "Clip" not in ops(result.model)
    kept = prune(model, PruneConfig(filters=0.5, scorer="l1", round_to=1, simplify=False))
    assert kept.report["simplified"] == {} and "Clip" in ops(kept.model)
    assert ops(kept.model) == ops(model)
    # the same channels go either way (the rewrite changes no channel's weights); the rewritten model
    # costs less: each element-wise op counts one MAC per element
    assert [g.get("channels_after") for g in result.report["groups"]] == [g.get("channels_after") for g in kept.report["groups"]]
    assert result.report["after"]["macs"] < kept.report["after"]["macs"]
    np.testing.assert_allclose(result.report["fidelity"]["cosine"], kept.report["fidelity"]["cosine"], atol=1e-5)


def affine_then_conv(k: int = 1, pad: int = 0) -> onnx.ModelProto:
    """conv1 -> Relu -> Mul(s, .) -> Sub(., c) -> conv2 (k x k, `pad`): PP-LCNet's affine after an activation."""
    b = Builder(seed=5)
    h = b.relu("relu", b.conv("conv1", "x", 3, 8))
    h = b.node("Mul", "mul", [b.const("s", b.rng.uniform(-2, 2, [8, 1, 1])), h])
    h = b.node("Sub", "sub", [h, b.const("c", b.rng.standard_normal([1, 8, 1, 1]))])
    b.output(b.conv("conv2", h, 8, 4, k=k, pad=pad))
    return b.model(x_input())


def test_affine_before_an_unpadded_conv_folds_into_its_filters_and_bias():
    check_rewrite(affine_then_conv(), {"affine_before_conv": 2}, ["Conv", "Relu", "Conv"])
    check_rewrite(affine_then_conv(k=3), {"affine_before_conv": 2}, ["Conv", "Relu", "Conv"])  # 3x3 unpadded: exact


def test_affine_before_a_padded_conv_is_left():
    """The padding would be zeros of the affine's output, not of its input."""
    check_rewrite(affine_then_conv(k=3, pad=1), {})


def test_a_model_read_again_from_its_file_is_rewritten_again(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(hard_swish(), str(path))
    loaded = load(str(path), vetted=True, runs=False)
    assert loaded.simplified == {"hard_swish": 1} and loaded.runnable == path  # the file as given
    assert "HardSigmoid" in ops(loaded.model) and "HardSigmoid" in ops(loaded.file.load())
    assert not loaded.file.verbatim
    as_given = load(str(path), vetted=True, runs=False, simplify=False)
    assert as_given.simplified == {} and "Clip" in ops(as_given.file.load())


def test_reference_outputs_come_from_the_model_as_given():
    model = hard_swish()
    loaded = load(model, vetted=True, runs=False)
    assert loaded.runnable is model and "Clip" in ops(loaded.runnable)
    assert "Clip" not in ops(loaded.model)


def test_obs_and_recovery_run_on_the_rewritten_model():
    """Scoring and recovery read layers of the loaded model by their output names: the folded Conv writes
    what the last folded Add wrote, so they must see the rewritten model, not the one given."""
    model = affine_chain()
    rng = np.random.default_rng(0)
    calibration = CalibrationSet({"x": rng.standard_normal((40, 3, 16, 16)).astype(np.float32)})
    result = prune(model, PruneConfig(filters=0.5, scorer="obs", round_to=1, calibration=calibration))
    assert result.report["simplified"] == {"affine_into_conv": 4}
    assert ops(result.model) == ["Conv", "Relu", "Conv"]
    assert result.report["fidelity"]["cosine"] > 0.5


def test_before_and_the_macs_target_are_of_the_model_as_given():
    """The rewrite removes element-wise ops (one MAC per element each): the report's "before" is the model
    as given, and --target-macs a share of its MACs, so the rewrite counts towards it."""
    model = hard_swish()
    given = load(model, vetted=True, runs=False, simplify=False).cost
    loaded = load(model, vetted=True, runs=False)
    assert loaded.given_cost == given and loaded.cost["macs"] < given["macs"]
    report = prune(model, PruneConfig(target_macs=0.7, scorer="l1", round_to=1)).report
    assert report["before"]["macs"] == given["macs"]
    kept = report["after"]["macs"] / given["macs"]
    assert 0.6 < kept <= 0.7


def test_a_division_by_zero_is_left_and_nothing_before_it_is_scaled_twice():
    b = Builder(seed=6)
    h = b.conv("conv1", "x", 3, 4)
    h = b.node("Mul", "mul", [b.const("s", b.rng.uniform(0.5, 2, [4, 1, 1])), h])
    h = b.node("Div", "div", [h, b.const("d", np.array([1.0, 0.0, 2.0, 1.0]).reshape(4, 1, 1))])
    b.output(b.node("Tanh", "tanh", [h]))
    check_rewrite(b.model(x_input()), {"affine_into_conv": 1}, ["Conv", "Div", "Tanh"])


def test_a_constant_that_widens_the_data_is_not_folded_into_the_conv_after_it():
    """A one-channel image minus a three-channel mean: the Conv reads three channels the data has not."""
    b = Builder(seed=7)
    h = b.node("Sub", "sub", ["x", b.const("mean", b.rng.standard_normal([1, 3, 1, 1]))])
    b.output(b.conv("conv", h, 3, 4, k=1, pad=0))
    check_rewrite(b.model(x_input([1, 1, 8, 8])), {})


def test_a_hard_swish_over_integers_is_left():
    b = Builder(seed=8)
    x = b.node("Cast", "cast", ["x"], to=onnx.TensorProto.INT32)
    three, zero, six = (b.const(n, v, np.int32) for n, v in (("three", 3), ("zero", 0), ("six", 6)))
    gate = b.node("Clip", "clip", [b.node("Add", "add3", [x, three]), zero, six])
    out = b.node("Div", "div", [b.node("Mul", "mul", [x, gate]), six])
    b.output(b.node("Cast", "back", [out], to=onnx.TensorProto.FLOAT))
    check_rewrite(b.model(x_input([1, 4]), opset=14), {})


def test_no_simplify_holds_for_every_step():
    model = affine_chain()
    result = prune(model, PruneConfig(filters=0.5, scorer="l1", round_to=1, steps=2, simplify=False))
    assert result.report["simplified"] == {} and "Mul" in ops(result.model)


def test_the_macs_target_is_scaled_to_the_model_as_loaded(monkeypatch):
    """--target-macs F of the model as given is F * given / rewritten of the model the allocation sees."""
    import onnxprune.stages as stages

    seen = []
    original = stages.choose_channels

    def spy(*args, **kwargs):
        seen.append(kwargs["target_macs"])
        return original(*args, **kwargs)

    monkeypatch.setattr(stages, "choose_channels", spy)
    model = hard_swish()
    loaded = load(model, vetted=True, runs=False)
    prune(model, PruneConfig(target_macs=0.7, scorer="l1", round_to=1))
    assert seen[0] == pytest.approx(0.7 * loaded.given_cost["macs"] / loaded.cost["macs"])


def test_the_cost_as_given_counts_tensors_shape_inference_cannot_reach():
    """An onnxruntime contrib op ahead of the Conv stops ONNX shape inference: the shapes of the tensors the
    rules removed are read off onnxruntime, as for the model as loaded."""
    from onnx import helper

    b = Builder(seed=9)
    weight, scale = b.randn("W", [8, 3, 3, 3]), b.const("s", b.rng.uniform(-2, 2, [8, 1, 1]))
    nodes = [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"), helper.make_node("Conv", ["g", weight], ["t"]),
             helper.make_node("Mul", [scale, "t"], ["y"])]
    graph = helper.make_graph(nodes, "contrib", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 14, 14])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    loaded = load(model)
    assert loaded.simplified == {"affine_into_conv": 1}
    assert loaded.given_cost == load(model, simplify=False).cost


def test_the_cli_s_no_simplify_keeps_the_ops_and_inspect_reports_the_rewrites(tmp_path):
    from click.testing import CliRunner

    from onnxprune.cli import main

    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(hard_swish(), str(path))
    result = CliRunner().invoke(main, ["prune", str(path), str(out), "--filters", "0.25", "--no-simplify", "-q"])
    assert result.exit_code == 0, result.output
    assert "Clip" in ops(onnx.load(str(out)))
    result = CliRunner().invoke(main, ["prune", str(path), str(out), "--filters", "0.25", "-q"])
    assert result.exit_code == 0 and "Clip" not in ops(onnx.load(str(out)))
    shown = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert json.loads(shown.output)["simplified"] == {"hard_swish": 1}
    shown = CliRunner().invoke(main, ["inspect", str(path), "--json", "--no-simplify"])
    assert json.loads(shown.output)["simplified"] == {}


def test_the_summary_names_the_rewrites():
    from click.testing import CliRunner

    from onnxprune.cli import main

    with CliRunner().isolated_filesystem():
        onnx.save(hard_swish(), "model.onnx")
        result = CliRunner().invoke(main, ["prune", "model.onnx", "out.onnx", "--filters", "0.25"])
        assert result.exit_code == 0, result.output
        assert "simplified 1 hard swish" in result.output
        result = CliRunner().invoke(main, ["prune", "model.onnx", "out.onnx", "--filters", "0.25", "--no-simplify"])
        assert result.exit_code == 0 and "simplified" not in result.output


def test_fused_convs_are_spelled_out_as_conv_and_activation():
    from tests.ops.test_fused import fused_conv_activations

    check_rewrite(fused_conv_activations(), {"fused_conv": 3}, ["Conv", "Relu", "Conv", "Clip", "Conv", "Relu", "Conv"])


def test_a_fused_conv_residual_becomes_conv_add_and_activation():
    from tests.ops.test_fused import fused_conv_residual

    check_rewrite(fused_conv_residual(), {"fused_conv": 2}, ["Conv", "Relu", "Conv", "Add", "Relu", "Conv"])


@pytest.mark.parametrize("activation, params, op", [("LeakyRelu", [0.2], "LeakyRelu"), ("HardSigmoid", [0.3, 0.4], "HardSigmoid"),
                                                    ("Sigmoid", [], "Sigmoid"), ("Tanh", [], "Tanh")])
def test_each_fused_activation_becomes_its_onnx_op(activation, params, op):
    check_rewrite(single_fused_conv(activation, params), {"fused_conv": 1}, ["Conv", op])


def test_a_fused_activation_onnx_lacks_is_left():
    model = single_fused_conv("Swish", [])  # not one onnxruntime runs either: the rule only reads it
    after, found = simplify_model(model)
    assert found == {} and ops(after) == ["FusedConv"]


def single_fused_conv(activation: str, params: list[float]) -> onnx.ModelProto:
    b = Builder(seed=6)
    weight = b.randn("w", [8, 3, 3, 3], 0.3)
    attrs = {"activation": activation, **({"activation_params": params} if params else {})}
    b.output(b.node("FusedConv", "fused", ["x", weight, b.randn("bias", [8], 0.1)], domain="com.microsoft",
                    kernel_shape=[3, 3], pads=[1] * 4, **attrs))
    return b.model(x_input(), outputs=[("y", [1, 8, 16, 16])], domains={"com.microsoft": 1})


def packed_pick(perm: list[int]) -> onnx.ModelProto:
    """x [2, 3, 12] -> Reshape [2, 3, 3, 4] -> Unsqueeze(0) -> Transpose(perm) -> Squeeze(3) -> Gather(1):
    torch's way of picking K out of a packed Q/K/V when perm swaps only axes 0 and 3."""
    b = Builder(seed=7)
    h = b.node("Reshape", "split", ["x", b.const("target", [2, 3, 3, 4], np.int64)])
    h = b.node("Unsqueeze", "unsqueeze", [h, b.const("axis0", [0], np.int64)])
    h = b.node("Transpose", "swap", [h], perm=perm)
    h = b.node("Squeeze", "squeeze", [h, b.const("axis3", [3], np.int64)])
    b.output(b.node("Gather", "pick", [h, b.const("one", 1, np.int64)], axis=0))
    return b.model([("x", [2, 3, 12])], outputs=[("y", None)])


def test_a_gather_out_of_a_packed_tensor_becomes_a_slice_of_its_last_axis():
    after = check_rewrite(packed_pick([3, 1, 2, 0, 4]), {"packed_qkv": 1}, ["Slice"])
    starts = [onnx.numpy_helper.to_array(t) for t in after.graph.initializer]
    assert [4] in [list(v) for v in starts] and [8] in [list(v) for v in starts]


def test_a_pick_that_moves_the_leading_axes_too_is_left():
    check_rewrite(packed_pick([3, 2, 1, 0, 4]), {})


def test_torch_attention_s_packed_q_k_v_become_slices_at_loading():
    from tests.ops.test_attention import torch_packed_attention

    model = torch_packed_attention()
    loaded = load(model)
    assert loaded.simplified == {"packed_qkv": 3}
    assert "Gather" not in ops(loaded.model)
    assert_same_outputs(model, loaded.model)


def dynamic_packed_pick(constant_target: bool = False) -> onnx.ModelProto:
    """x [S, B, 12] (symbolic) -> Reshape to Concat(Shape(x)[0:2], [3, 4]) (torch's unflatten; or a constant
    [-1, 3, 3, 4] that only matches at B = 3) -> Unsqueeze(0) -> Transpose(3, 1, 2, 0, 4) -> Squeeze(3) -> Gather(1)."""
    b = Builder(seed=8)
    if constant_target:
        target = b.const("target", [-1, 3, 3, 4], np.int64)
    else:
        lead = b.node("Slice", "lead", [b.node("Shape", "shape", ["x"]), b.const("zero", [0], np.int64),
                                        b.const("two", [2], np.int64), b.const("axis0", [0], np.int64)])
        target = b.node("Concat", "target", [lead, b.const("parts", [3, 4], np.int64)], axis=0)
    h = b.node("Reshape", "split", ["x", target])
    h = b.node("Unsqueeze", "unsqueeze", [h, b.const("new0", [0], np.int64)])
    h = b.node("Transpose", "swap", [h], perm=[3, 1, 2, 0, 4])
    h = b.node("Squeeze", "squeeze", [h, b.const("axis3", [3], np.int64)])
    b.output(b.node("Gather", "pick", [h, b.const("one", 1, np.int64)], axis=0))
    return b.model([("x", ["S", "B", 12])], outputs=[("y", None)])


def test_a_packed_pick_with_dynamic_dims_is_rewritten_and_holds_at_every_size():
    model = dynamic_packed_pick()
    loaded = load(model, {"x": [2, 3, 12]})
    assert loaded.simplified == {"packed_qkv": 1}
    for dims in ([5, 1, 12], [1, 4, 12]):
        feed = {"x": np.random.default_rng(0).standard_normal(dims).astype(np.float32)}
        np.testing.assert_array_equal(run(loaded.model, feed)[0], run(model, feed)[0])


def test_a_constant_target_that_fixes_a_dynamic_dim_is_left():
    assert load(dynamic_packed_pick(constant_target=True), {"x": [2, 3, 12]}).simplified == {}
