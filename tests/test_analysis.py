"""Dependency analysis, allocation and the cost model on small hand-checked graphs."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import models
from tests.builders import Builder, x_input
from onnxprune import PruneConfig, inspect, prune
from onnxprune.allocate import ensure_nonempty, keep_counts, round_keep
from onnxprune.loading import load
from onnxprune.stages import analyze_model
from onnxprune.validate import model_cost


def analysis_of(model):
    return analyze_model(load(model))


def test_residual_add_joins_both_producers_into_one_group():
    analysis = analysis_of(models.residual())
    prunable = analysis.prunable_groups()
    joined = [g for g in prunable if len(g.sources) == 2]
    assert len(joined) == 1 and {s.node.name for s in joined[0].sources} == {"conv1", "conv2"}
    assert joined[0].channels == 8
    assert {"bn1", "bn2", "add1", "conv3"} <= set(joined[0].members)


def test_concat_keeps_groups_separate_and_maps_offsets():
    analysis = analysis_of(models.concat())
    names = sorted(g.name for g in analysis.prunable_groups())
    assert names == ["conv_a", "conv_b"]
    concat_ids = analysis.maps["concat1_out"].ids
    assert len(concat_ids) == 10
    owner = analysis.group_of[analysis.label[concat_ids]]
    by_name = {g.name: g.index for g in analysis.groups}
    assert owner.tolist() == [by_name["conv_a"]] * 4 + [by_name["conv_b"]] * 6


def test_grouped_conv_keeps_its_blocks_equal():
    analysis = analysis_of(models.grouped())
    conv2 = next(g for g in analysis.groups if g.name == "conv2")
    assert conv2.channels == 4  # 8 outputs in 2 blocks: position j of both blocks is one unit


def test_group_norm_prunes_whole_norm_groups():
    analysis = analysis_of(models.group_norm())
    group = next(g for g in analysis.prunable_groups() if g.name == "conv1")
    assert group.channels == 4  # 8 channels in 4 normalisation groups


def test_coverage_and_costs_of_conv_chain():
    info = inspect(models.conv_chain())
    # conv1 (8 channels) prunable, conv2 (4 channels) reaches the output: 8 / 12
    assert info["coverage"] == pytest.approx(8 / 12)
    # conv1: 16*16 outputs * 8 filters * 3*3*3; relu: 8*16*16; conv2: 4*16*16 * 8*3*3
    assert info["macs"] == 256 * 8 * 27 + 8 * 256 + 256 * 4 * 72
    assert info["params"] == 8 * 27 + 8 + 4 * 72 + 4


def test_cost_model_counts_gemm_and_matmul():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 16])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 8])
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model_cost(model, {"x": [2, 5, 16]}) == {"params": 128, "macs": 2 * 5 * 8 * 16}


def test_subgraph_use_blocks_the_group():
    """A tracked tensor read inside an If branch cannot be sliced: the group stays whole."""
    model = models.conv_chain()
    graph = model.graph
    relu_out = next(n.output[0] for n in graph.node if n.op_type == "Relu")
    branch_out = helper.make_tensor_value_info("b_out", onnx.TensorProto.FLOAT, None)
    then_graph = helper.make_graph([helper.make_node("Identity", [relu_out], ["b_out"])], "then", [], [branch_out])
    else_graph = helper.make_graph([helper.make_node("Identity", [relu_out], ["b_out"])], "else", [], [branch_out])
    graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=then_graph, else_branch=else_graph))
    graph.output.append(helper.make_tensor_value_info("if_out", onnx.TensorProto.FLOAT, None))
    groups = {g["name"]: g for g in inspect(model)["groups"]}
    assert not groups["conv1"]["prunable"]
    assert any("subgraph" in r or "graph output" in r for r in groups["conv1"]["reasons"])


@pytest.mark.parametrize("keep,channels,step,expected", [
    (11, 16, None, 8), (12, 16, None, 16), (3, 8, None, 3), (5, 64, 8, 8), (0, 8, None, 1), (30, 32, 4, 32),
])
def test_round_keep(keep, channels, step, expected):
    assert round_keep(keep, channels, step) == expected


@pytest.mark.parametrize("keep,units,step,width,expected", [
    (11, 16, None, 64, 11),  # 16 heads of 64 channels: any head count keeps a multiple of 8 channels
    (11, 16, 8, 64, 11), (3, 4, None, 8, 3),
    (5, 32, None, 2, 4), (7, 32, 8, 4, 8),  # units of 2 (4) channels: multiples of 4 (2) units
    (3, 4, None, 4, 4),  # 16 channels in all, in units of 4: the step of 8 channels is 2 units
    (4, 8, None, 5, 4), (4, 8, 8, 5, 8),  # a grouped conv's 8 units of 5 channels: 8 channels would need all 8
    # units, so the default does not round them; an explicit --round-to 8 does (and a note says so)
])
def test_round_keep_counts_the_channels_of_units_several_wide(keep, units, step, width, expected):
    assert round_keep(keep, units, step, width) == expected


def test_uniform_and_global_keep_counts():
    analysis = analysis_of(models.residual_downsample())
    prunable = analysis.prunable_groups()
    scores = {g.index: np.arange(g.channels, dtype=float) + 1 for g in prunable}
    uniform = keep_counts(analysis, scores, 0.5, False, round_to=1)
    assert {gi: n for gi, n in uniform.items()} == {g.index: g.channels // 2 for g in prunable}
    total = sum(g.channels for g in prunable)
    global_counts = keep_counts(analysis, scores, 0.5, True, round_to=1)
    assert sum(global_counts.values()) == total - total // 2


def test_a_split_part_never_loses_all_its_channels():
    analysis = analysis_of(models.split())
    group = analysis.prunable_groups()[0]
    scores = {group.index: np.array([9, 8, 7, 0, 0, 0, 0, 0], dtype=float)}
    keep = ensure_nonempty(analysis, scores, {group.index: np.array([0, 1])})
    assert len(keep[group.index]) == 3  # one channel of the second part (positions 3..7) added back
    result = prune(models.split(), PruneConfig(filters=0.9, round_to=1))
    assert result.report["after"]["macs"] < result.report["before"]["macs"]


def test_an_op_of_another_domain_is_not_read_as_onnxs_of_the_same_name():
    """Handlers answer for ONNX's ops, and for onnxruntime's contrib ops (com.microsoft) only where they say
    they read them: a Conv of onnxruntime's blocked layout is not ONNX's Conv."""
    from onnxprune.ops import handler_for

    assert handler_for("Conv") is handler_for("Conv", "ai.onnx") is handler_for("Conv", None) is not None
    assert handler_for("Conv", "com.microsoft.nchwc") is None and handler_for("Conv", "com.microsoft") is None
    assert handler_for("Gelu", "com.microsoft") is handler_for("Gelu") is not None
    assert handler_for("SkipLayerNormalization", "com.microsoft") is not None
    assert handler_for("SkipLayerNormalization", "com.example") is None


def grouped_conv_units():
    """conv1 (3->40) -> grouped conv (40->40, group 5) -> conv3 (40->4): conv1's group is 8 units of 5 channels."""
    b = Builder(0)
    h = b.relu("relu2", b.conv("gconv", b.relu("relu1", b.conv("conv1", "x", 3, 40)), 40, 40, group=5))
    b.output(b.conv("conv3", h, 40, 4))
    return b.model(x_input(), [("y", [1, 4, 16, 16])], name="grouped_conv_units")


def test_a_grouped_conv_s_units_are_cut_by_default_and_an_explicit_multiple_that_forbids_it_is_said():
    model = grouped_conv_units()
    cut = prune(model, PruneConfig(filters=0.5, scorer="l1"))
    assert cut.report["after"]["macs"] < 0.6 * cut.report["before"]["macs"]
    whole = prune(model, PruneConfig(filters=0.5, scorer="l1", round_to=8))
    assert whole.report["after"]["macs"] == whole.report["before"]["macs"]
    assert any(n.startswith("--round-to 8: 2 group(s) cannot be cut") for n in whole.report["scoring_notes"])
    assert not any(n.startswith("--round-to") for n in cut.report["scoring_notes"])
