"""onnxruntime's fused ops (com.microsoft domain, as onnxruntime.transformers.optimizer writes them):
Attention's heads are pruned by slicing its packed Q, K, V weight per head, MultiHeadAttention's by
its projections; BiasGelu, FastGelu and
QuickGelu pass channels and slice their bias; SkipLayerNormalization blocks the hidden size it
normalises; a model importing the com.microsoft opset loads and inspects. FusedConv (onnxruntime's
ORT_ENABLE_EXTENDED output) is pruned as Conv, its residual Z joined with its output."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxprune import PruneConfig, inspect, prune
from onnxprune.loading import load
from onnxprune.plan import Plan
from onnxprune.stages import analyze_model
from onnxprune.validate.cost import node_macs
from tests.builders import Builder, random_input, run, x_input
from tests.oracle import family_tests

MICROSOFT = {"com.microsoft": 1}
SEQUENCE = [1, 5, 16]


def _skip_layer_norm(b: Builder, name: str, x: str, skip: str, width: int) -> str:
    """SkipLayerNormalization(x, skip, gamma, beta, bias) over the last axis."""
    params = [b.const(f"{name}.gamma", b.rng.uniform(0.5, 1.5, width)), b.randn(f"{name}.beta", [width], 0.1),
              b.randn(f"{name}.bias", [width], 0.1)]
    return b.node("SkipLayerNormalization", name, [x, skip, *params], domain="com.microsoft", epsilon=1e-5)


def fused_ffn(seed: int = 0):
    """x [1,5,16] -> fc1(16->32) -> BiasGelu(bias[32]) -> fc2(32->16) -> SkipLayerNormalization(skip x)
    -> fc3(16->8): a fused BERT feed-forward block.

    Prunable: fc1's 32 channels (BiasGelu's bias is sliced). fc2's 16 are blocked by the normalisation.
    """
    b = Builder(seed)
    h = b.node("BiasGelu", "gelu1", [b.matmul("fc1", "x", 16, 32), b.randn("gelu1.bias", [32], 0.1)],
               domain="com.microsoft")
    h = _skip_layer_norm(b, "skip_norm1", b.matmul("fc2", h, 32, 16), "x", 16)
    b.output(b.matmul("fc3", h, 16, 8))
    return b.model([("x", SEQUENCE)], outputs=[("y", [1, 5, 8])], name="fused_ffn", domains=MICROSOFT)


def fast_gelu(seed: int = 0):
    """x [1,5,16] -> fc1(16->32) -> FastGelu(bias[32]) -> fc2(32->24) -> QuickGelu -> fc3(24->8).

    Prunable: fc1's 32 channels and fc2's 24.
    """
    b = Builder(seed)
    h = b.node("FastGelu", "gelu1", [b.matmul("fc1", "x", 16, 32), b.randn("gelu1.bias", [32], 0.1)],
               domain="com.microsoft")
    h = b.node("QuickGelu", "gelu2", [b.matmul("fc2", h, 32, 24)], domain="com.microsoft", alpha=1.702)
    b.output(b.node("MatMul", "fc3", [h, b.randn("fc3.weight", [24, 8], 1 / math.sqrt(24))]))
    return b.model([("x", SEQUENCE)], outputs=[("y", [1, 5, 8])], name="fast_gelu", domains=MICROSOFT)


def blocked_skip_layer_norm(seed: int = 0):
    """x [1,5,16] -> fc1(16->16) -> SkipLayerNormalization(skip x) -> fc2(16->8).

    Blocked: fc1's channels are the hidden size the normalisation mixes.
    """
    b = Builder(seed)
    h = _skip_layer_norm(b, "skip_norm1", b.matmul("fc1", "x", 16, 16), "x", 16)
    b.output(b.matmul("fc2", h, 16, 8))
    return b.model([("x", SEQUENCE)], outputs=[("y", [1, 5, 8])], name="blocked_skip_layer_norm",
                   domains=MICROSOFT)


HEADS = 4


def fused_attention(seed: int = 0, qkv_hidden_sizes=None, score_bias: bool = False, score_bias_input: bool = False):
    """x [1,5,16] -> Attention(num_heads 4, packed weight [16, q+k+v], bias, a padding mask) -> out(v->16).

    Prunable: the 4 heads (head_size V channels each; their Q, K, V columns and bias go with them).
    qkv_hidden_sizes: Q, K and V widths (default 16 each); score_bias: a constant per-head score bias;
    score_bias_input: the per-head score bias is a model input (blocked; x goes through fc0 (16->16) first).
    """
    b = Builder(seed)
    sizes = qkv_hidden_sizes or [16, 16, 16]
    inputs = [b.matmul("fc0", "x", 16, 16) if score_bias_input else "x", b.randn("attention.weight", [16, sum(sizes)], 0.25), b.randn("attention.bias", [sum(sizes)], 0.1),
              b.const("attention.mask", [[1, 1, 1, 1, 0]], np.int32)]
    if score_bias or score_bias_input:
        inputs += ["", "score_bias" if score_bias_input else b.randn("attention.score_bias", [1, HEADS, 5, 5], 0.5)]
    extra = {"qkv_hidden_sizes": sizes} if qkv_hidden_sizes else {}
    h = b.node("Attention", "attention", inputs, domain="com.microsoft", num_heads=HEADS, **extra)
    b.output(b.matmul("out", h, sizes[2], 16))
    inputs = [("x", SEQUENCE)] + ([("score_bias", [1, HEADS, 5, 5])] if score_bias_input else [])
    return b.model(inputs, outputs=[("y", SEQUENCE)], name="fused_attention", domains=MICROSOFT)


def multi_head_attention(seed: int = 0, cached: bool = False):
    """x [1,5,16] -> q, k (16->16), v (16->24) -> MultiHeadAttention(num_heads 4, packed bias [56], a
    constant per-head score bias) -> out(24->16).

    Prunable: the 4 heads (4 channels of q and of k, 6 of v each). cached: its present key is an output
    too: blocked.
    """
    b = Builder(seed)
    q, k, v = (b.matmul(name, "x", 16, n) for name, n in (("q", 16), ("k", 16), ("v", 24)))
    inputs = [q, k, v, b.randn("attention.bias", [56], 0.1), "", b.randn("attention.score_bias", [1, HEADS, 5, 5], 0.5)]
    outputs = 2 if cached else 1
    h = b.node("MultiHeadAttention", "attention", inputs, n_out=outputs, domain="com.microsoft", num_heads=HEADS)
    b.output(b.matmul("out", h[0] if cached else h, 24, 16))
    if cached:
        b.output(h[1], "present_key")
    names = [("y", SEQUENCE)] + ([("present_key", [1, HEADS, 5, 4])] if cached else [])
    return b.model([("x", SEQUENCE)], outputs=names, name="multi_head_attention", domains=MICROSOFT)


def ort_extended(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnxruntime writes it after optimizing at ORT_ENABLE_EXTENDED (Conv + activation fused)."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def conv_activations(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,16,16] -> conv1(3->8) -> Relu -> conv2(8->8) -> Clip(0, 6) -> depthwise dw(group 8) -> Relu
    -> conv3(8->4), unfused. Prunable: conv1's 8 channels, and conv2's 8 joined with dw's through the
    depthwise conv."""
    b = Builder(seed)
    h = b.relu("relu1", b.conv("conv1", "x", 3, 8))
    h = b.node("Clip", "clip2", [b.conv("conv2", h, 8, 8), b.const("clip2.min", 0.0), b.const("clip2.max", 6.0)])
    h = b.relu("relu3", b.conv("dw", h, 8, 8, group=8))
    b.output(b.conv("conv3", h, 8, 4))
    return b.model(x_input(), name="conv_activations")


def fused_conv_activations(seed: int = 0) -> onnx.ModelProto:
    """`conv_activations` optimized by onnxruntime: conv1, conv2 (Clip, activation_params [0, 6]) and dw are
    FusedConvs."""
    return ort_extended(conv_activations(seed))


def _fused_conv(b: Builder, name: str, x: str, cin: int, cout: int, residual: str | None = None, **attrs) -> str:
    """A 3x3 FusedConv (Relu unless `activation` is given), Z = `residual` when given."""
    w = b.randn(f"{name}.weight", [cout, cin, 3, 3], 1 / math.sqrt(cin * 9))
    inputs = [x, w, b.randn(f"{name}.bias", [cout], 0.1)] + ([residual] if residual else [])
    attrs = {"activation": "Relu", **attrs}
    return b.node("FusedConv", name, inputs, domain="com.microsoft", kernel_shape=[3, 3], pads=[1] * 4, **attrs)


def fused_conv_residual(seed: int = 0, z_input: bool = False) -> onnx.ModelProto:
    """x -> conv1 (FusedConv Relu, 3->8) -> conv2 (FusedConv Relu, 8->8, Z = conv1's output) -> conv3(8->4):
    Conv + Add + Relu as one node (onnxruntime writes it so at other levels; built by hand).

    Prunable: one group of 8, conv1 and conv2 joined through Z. z_input: x -> conv1 (Z a model input) ->
    conv3: blocked.
    """
    b = Builder(seed)
    h = _fused_conv(b, "conv1", "x", 3, 8, residual="z" if z_input else None)
    h = h if z_input else _fused_conv(b, "conv2", h, 8, 8, residual=h)
    b.output(b.conv("conv3", h, 8, 4))
    inputs = x_input() + ([("z", [1, 8, 16, 16])] if z_input else [])
    return b.model(inputs, outputs=[("y", [1, 4, 16, 16])], name="fused_conv_residual", domains=MICROSOFT)


BUILDERS = {
    "fused_attention": fused_attention,
    "multi_head_attention": multi_head_attention,
    "blocked_multi_head_attention_cached": lambda seed=0: multi_head_attention(seed, cached=True),
    "fused_attention_qkv_sizes": lambda seed=0: fused_attention(seed, qkv_hidden_sizes=[16, 16, 24]),
    "fused_attention_score_bias": lambda seed=0: fused_attention(seed, score_bias=True),
    "fused_ffn": fused_ffn,
    "fast_gelu": fast_gelu,
    "blocked_skip_layer_norm": blocked_skip_layer_norm,
    "blocked_fused_attention_score_bias_input": lambda seed=0: fused_attention(seed, score_bias_input=True),
}
BLOCKED = {"blocked_fused_attention_score_bias_input": "fused attention: a computed per-head score bias",
           "blocked_skip_layer_norm": "normalises across the channel axis (the hidden size)",
           "blocked_multi_head_attention_cached": "its key/value cache is read or written"}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)

# FusedConv as given (`simplify=False`): loading otherwise spells it out as Conv + activation (ops/rules/fused_conv.py)
FUSED_CONV_BUILDERS = {
    "fused_conv_activations": fused_conv_activations,
    "fused_conv_residual": fused_conv_residual,
    "blocked_fused_conv_residual_input": lambda seed=0: fused_conv_residual(seed, z_input=True),
}
FUSED_CONV_BLOCKED = {"blocked_fused_conv_residual_input": "its residual Z spans the channels but is computed"}

test_pruning_dead_fused_conv_channels_is_exact, test_blocked_fused_conv_is_left_whole_with_a_reason = \
    family_tests(FUSED_CONV_BUILDERS, FUSED_CONV_BLOCKED, simplify=False)


def test_a_fused_conv_residual_out_of_a_layer_norm_suggests_hidden():
    """x -> conv1 (FusedConv, 3->8, Z = LayerNorm over the 8 channels of z, channels last) -> conv3."""
    b = Builder(0)
    z = b.node("Transpose", "z_nhwc", ["z"], perm=[0, 2, 3, 1])
    z = b.node("LayerNormalization", "z_norm", [z, b.const("z_norm.scale", np.ones(8)),
                                                 b.const("z_norm.bias", np.zeros(8))], axis=-1)
    h = _fused_conv(b, "conv1", "x", 3, 8, residual=b.node("Transpose", "z_nchw", [z], perm=[0, 3, 1, 2]))
    b.output(b.conv("conv3", h, 8, 4))
    model = b.model(x_input() + [("z", [1, 8, 16, 16])], outputs=[("y", [1, 4, 16, 16])], name="norm_residual",
                    domains=MICROSOFT, opset=17)
    group = next(g for g in inspect(model, simplify=False)["groups"] if "conv1" in g["sources"])
    assert not group["prunable"] and any("LayerNormalization 'z_norm': try --hidden" in r for r in group["reasons"])


def test_a_model_importing_the_microsoft_opset_inspects_with_its_coverage():
    report = inspect(fused_ffn())
    reasons = [r for g in report["groups"] for r in g.get("reasons", [])]
    assert not any("no handler" in r for r in reasons), reasons
    assert [g["channels"] for g in report["groups"] if g["prunable"]] == [32]
    assert np.isclose(report["coverage"], 32 / (32 + 16 + 8))


@pytest.mark.parametrize("build,sources", [(fused_attention, ["attention"]), (multi_head_attention, ["q", "k", "v"])])
def test_the_fused_attention_heads_are_one_group_of_four_units(build, sources):
    (group,) = [g for g in inspect(build())["groups"] if g["prunable"]]
    assert (group["sources"], group["channels"]) == (sources, HEADS)


def test_pruning_heads_slices_the_packed_weight_per_head_and_sets_num_heads():
    model = fused_attention(qkv_hidden_sizes=[16, 16, 24], score_bias=True)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    analysis = analyze_model(load(model))
    (group,) = analysis.prunable_groups()
    result = prune(model, PruneConfig(plan=Plan.from_keep(analysis, {group.index: np.array([0, 2])})))
    (node,) = [n for n in result.model.graph.node if n.op_type == "Attention"]
    pruned = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["num_heads"], list(attrs["qkv_hidden_sizes"])) == (2, [8, 8, 12])
    # Q and K heads are 4 columns wide, V heads 6: keep heads 0 and 2 of each
    columns = np.r_[0:4, 8:12, 16:20, 24:28, 32:38, 44:50]
    np.testing.assert_array_equal(pruned[node.input[1]], weights["attention.weight"][:, columns])
    np.testing.assert_array_equal(pruned[node.input[2]], weights["attention.bias"][columns])
    np.testing.assert_array_equal(pruned[node.input[5]], weights["attention.score_bias"][:, [0, 2]])


def test_multi_head_attention_macs_are_the_scores_and_the_context():
    shapes = {"q": (1, 5, 16), "k": (1, 5, 16), "y": (1, 5, 24)}
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4)
    assert node_macs(node, shapes, {}) == 5 * 5 * 16 + 5 * 5 * 24


def test_fused_attention_macs_count_the_projection_scores_and_context():
    shapes = {"x": (1, 5, 16), "w": (16, 56), "y": (1, 5, 24)}
    node = helper.make_node("Attention", ["x", "w"], ["y"], domain="com.microsoft", num_heads=4,
                            qkv_hidden_sizes=[16, 16, 24])
    assert node_macs(node, shapes, {}) == 5 * 16 * 56 + 5 * 5 * 16 + 5 * 5 * 24


def test_a_refused_fused_attention_shows_its_heads_blocked_with_the_reason():
    """Refused heads are a group of their own in `inspect`, even when no channels reach the op's input."""
    b = Builder(0)
    inputs = ["x", b.randn("attention.weight", [16, 48], 0.25), b.randn("attention.bias", [48], 0.1), "", "",
              "score_bias"]
    h = b.node("Attention", "attention", inputs, domain="com.microsoft", num_heads=HEADS)
    b.output(b.matmul("out", h, 16, 16))
    model = b.model([("x", SEQUENCE), ("score_bias", [1, HEADS, 5, 5])], outputs=[("y", SEQUENCE)],
                    name="refused_attention", domains=MICROSOFT)
    [group] = [g for g in inspect(model)["groups"] if g["sources"] == ["attention"]]
    assert not group["prunable"] and any("a computed per-head score bias" in r for r in group["reasons"])


def _fused_convs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type == "FusedConv" and n.domain == "com.microsoft"}


def test_onnxruntime_fuses_each_conv_with_its_activation_clip_and_depthwise_included():
    fused = _fused_convs(fused_conv_activations())
    attrs = {name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for name, n in fused.items()}
    assert sorted(fused) == ["conv1", "conv2", "dw"]
    assert (attrs["conv2"]["activation"], list(attrs["conv2"]["activation_params"])) == (b"Clip", [0.0, 6.0])
    assert attrs["dw"]["group"] == 8


def test_fused_convs_have_the_groups_of_the_unfused_model():
    def groups(model):
        return sorted((tuple(g["sources"]), g["channels"], g["prunable"]) for g in inspect(model, simplify=False)["groups"])

    assert groups(fused_conv_activations()) == groups(conv_activations())
    assert inspect(fused_conv_activations(), simplify=False)["coverage"] == inspect(conv_activations())["coverage"]


def test_pruning_half_the_filters_slices_the_fused_convs_as_convs():
    model = fused_conv_activations()
    result = prune(model, PruneConfig(filters=0.5, simplify=False))
    fused = _fused_convs(result.model)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    group = {name: {a.name: helper.get_attribute_value(a) for a in n.attribute}["group"] for name, n in fused.items()}
    assert [weights[fused[name].input[1]].shape for name in ("conv1", "conv2", "dw")] == \
        [(4, 3, 3, 3), (4, 4, 3, 3), (4, 1, 3, 3)]
    assert [weights[fused[name].input[2]].shape for name in ("conv1", "conv2", "dw")] == [(4,), (4,), (4,)]
    assert group["dw"] == 4
    assert result.report["after"]["macs"] < result.report["before"]["macs"]
    feed = random_input(result.model)
    assert run(result.model, feed)[0].shape == (1, 4, 16, 16)


def test_a_fused_conv_residual_is_one_group_with_the_conv_it_adds():
    (group,) = [g for g in inspect(fused_conv_residual(), simplify=False)["groups"] if g["prunable"]]
    assert (sorted(group["sources"]), group["channels"]) == (["conv1", "conv2"], 8)


def test_fused_conv_macs_are_the_conv_s_and_its_activation_s():
    shapes = {"x": (1, 8, 16, 16), "w": (4, 2, 3, 3), "y": (1, 4, 8, 8)}
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4, "group": 4}
    conv = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    fused = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", activation="Relu", **attrs)
    assert node_macs(conv, shapes, {}) == 4 * 8 * 8 * 2 * 3 * 3
    assert node_macs(fused, shapes, {}) == node_macs(conv, shapes, {}) + 4 * 8 * 8  # and its activation's


def test_a_fused_conv_residual_counts_its_add_as_the_graph_spelled_out_does():
    shapes = {"x": (1, 8, 16, 16), "w": (4, 8, 3, 3), "b": (4,), "z": (1, 4, 16, 16), "c": (1, 4, 16, 16),
              "s": (1, 4, 16, 16), "y": (1, 4, 16, 16)}
    attrs = {"kernel_shape": [3, 3], "pads": [1] * 4}
    fused = helper.make_node("FusedConv", ["x", "w", "b", "z"], ["y"], domain="com.microsoft", activation="Relu", **attrs)
    spelled_out = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Add", ["c", "z"], ["s"]),
                   helper.make_node("Relu", ["s"], ["y"])]
    assert node_macs(fused, shapes, {}) == sum(node_macs(node, shapes, {}) for node in spelled_out)
    without_bias = helper.make_node("FusedConv", ["x", "w", "", "z"], ["y"], domain="com.microsoft", activation="Relu", **attrs)
    assert node_macs(without_bias, shapes, {}) == node_macs(fused, shapes, {})
    loaded = load(fused_conv_residual())  # the model as given, and as loading spells it out (Conv, Add, Relu)
    assert loaded.simplified and loaded.given_cost["macs"] == loaded.cost["macs"]


def _recovery_layers(simplify: bool) -> dict[str, dict]:
    x = np.random.default_rng(0).standard_normal([20, 3, 16, 16]).astype(np.float32)
    layers = prune(fused_conv_activations(), PruneConfig(filters=0.5, scorer="l1", calibration={"x": x}, recover="lstsq",
                                                         simplify=simplify)).report["recovery"]["layers"]
    return {layer["name"]: layer for layer in layers}


def test_recovery_skips_a_fused_conv_as_given_with_the_reason():
    by_name = _recovery_layers(simplify=False)
    assert by_name["conv2"]["status"] == "skipped" and "fused activation" in by_name["conv2"]["reason"]
    assert by_name["conv3"]["status"] == "recovered"


def test_a_fused_conv_spelled_out_at_loading_is_recovered_as_a_conv():
    by_name = _recovery_layers(simplify=True)
    assert by_name["conv2"]["status"] == by_name["conv3"]["status"] == "recovered"
