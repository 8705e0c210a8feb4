"""The measured latency model: the fit on synthetic timings, layers built alone, the cache's key, and the
whole-model prediction from keep counts. No test here times anything for its figure (bench/ does)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.budget import CostModel, LatencyPredictor
from onnxprune.loading import load
from onnxprune.runtime import session
from onnxprune.stages import analyze_model
from onnxprune.validate import latency_model as lm

MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist_resnet.onnx"


def synthetic_ms(k_in, k_out, c_in, c_out, multiple):
    p_in = np.ceil(np.asarray(k_in) / multiple) * multiple / c_in
    p_out = np.ceil(np.asarray(k_out) / multiple) * multiple / c_out
    return 0.05 + 2.0 * p_in * p_out + 0.3 * p_in + 0.1 * p_out


@pytest.mark.parametrize("multiple", [1, 4, 8, 16])
def test_the_fit_finds_the_step_of_synthetic_timings(multiple):
    k_in, k_out = lm.sample_counts(96, 128)
    fit = lm.fit_layer("conv", 96, 128, k_in, k_out, synthetic_ms(k_in, k_out, 96, 128, multiple))
    assert fit.multiple == multiple
    unseen_in, unseen_out = np.array([70, 33, 96]), np.array([128, 100, 41])
    np.testing.assert_allclose(fit.predict(unseen_in, unseen_out),
                               synthetic_ms(unseen_in, unseen_out, 96, 128, multiple), rtol=1e-6)


def test_a_step_is_flat_below_the_multiple_and_drops_past_it():
    k_in, k_out = lm.sample_counts(64, 64)
    fit = lm.fit_layer("conv", 64, 64, k_in, k_out, synthetic_ms(k_in, k_out, 64, 64, 8))
    times = fit.predict(64, np.array([48, 41, 40]))
    assert times[0] == pytest.approx(times[1]) and times[2] < times[1]


def test_noise_does_not_buy_a_larger_step():
    k_in, k_out = lm.sample_counts(64, 64)
    noise = np.random.default_rng(0).normal(0, 1e-4, len(k_in))
    fit = lm.fit_layer("conv", 64, 64, k_in, k_out, synthetic_ms(k_in, k_out, 64, 64, 1) + noise)
    assert fit.multiple == 1


@pytest.fixture(scope="module")
def mnist():
    loaded = load(str(MNIST), {})
    return analyze_model(loaded)


def test_a_layer_alone_runs_at_other_channel_counts(mnist):
    layers = lm.timed_layers(mnist)
    assert len(layers) >= 7 and {layer.op for layer in layers} == {"Conv", "Gemm"}  # the head reads pruned channels
    layer = max(layers, key=lambda layer: layer.c_in)
    model = lm.layer_model(layer, layer.c_in // 2, 5)
    shape = list(layer.input_shape)
    shape[layer.data_axis] = layer.c_in // 2
    out = session(model).run(None, {"x": np.zeros(shape, np.float32)})[0]
    assert out.shape[1] == 5


class CountingTimer:
    def __init__(self):
        self.calls = 0

    def __call__(self, layer, threads):
        self.calls += 1
        k_in, k_out = lm.sample_counts(layer.c_in, layer.c_out, layer.kind)
        return lm.fit_layer(layer.name, layer.c_in, layer.c_out, k_in, k_out,
                            synthetic_ms(k_in, k_out, layer.c_in, layer.c_out, 1) * threads, layer.kind)


def test_the_cache_is_reused_only_for_the_same_layers_shapes_and_threads(mnist, tmp_path):
    layers = lm.timed_layers(mnist)
    cache, timer = lm.LatencyCache(tmp_path / "out.latency.json"), CountingTimer()
    fits, cached = lm.layer_fits(layers, 1, cache, timer)
    assert not cached and timer.calls == len(layers)
    again, cached = lm.layer_fits(layers, 1, lm.LatencyCache(tmp_path / "out.latency.json"), timer)
    assert cached and timer.calls == len(layers) and again == fits
    _, cached = lm.layer_fits(layers, 2, cache, timer)
    assert not cached and timer.calls == 2 * len(layers)
    wider = [replace(layer, input_shape=(layer.input_shape[0], layer.input_shape[1], 32, 32)) for layer in layers]
    _, cached = lm.layer_fits(wider, 1, cache, timer)
    assert not cached and timer.calls == 3 * len(layers)
    _, cached = lm.layer_fits(layers, 2, cache, timer)  # every entry is kept
    assert cached and timer.calls == 3 * len(layers)


def test_a_broken_cache_file_is_measured_anew(mnist, tmp_path):
    path = tmp_path / "out.latency.json"
    path.write_text("{not json")
    timer = CountingTimer()
    _, cached = lm.layer_fits(lm.timed_layers(mnist), 1, lm.LatencyCache(path), timer)
    assert not cached and timer.calls > 0


def test_the_prediction_replaces_each_layer_s_time_at_full_size(mnist):
    cost = CostModel.build(mnist)
    layers = lm.timed_layers(mnist)
    fits = [CountingTimer()(layer, 1) for layer in layers]
    predictor = LatencyPredictor.build(cost, fits, start_ms=10.0)
    full = {g.index: g.channels for g in mnist.prunable_groups()}
    assert predictor.ms(full) == pytest.approx(10.0)
    half = {g: c // 2 for g, c in full.items()}
    stem_in = {f.name: f.c_in if f.c_in == 1 else f.c_in / 2 for f in fits}  # the stem reads the image
    head = {layer.name for layer in layers if layer.op == "Gemm"}  # writes the classes, which stay
    out = {f.name: f.c_out if f.name in head else f.c_out / 2 for f in fits}
    expected = 10.0 + sum(float(f.predict(stem_in[f.name], out[f.name]) - f.predict(f.c_in, f.c_out)) for f in fits)
    assert predictor.ms(half) == pytest.approx(expected) and predictor.ms(half) < 10.0


def test_unnamed_nodes_are_predicted_as_named_ones():
    """Layers are matched to the cost model by name, or by output when nodes have none."""
    import onnx

    unnamed = onnx.load(str(MNIST))
    for node in unnamed.graph.node:
        node.name = ""
    predictions = []
    for model in (str(MNIST), unnamed):
        analysis = analyze_model(load(model, {}))
        fits = [CountingTimer()(layer, 1) for layer in lm.timed_layers(analysis)]
        predictor = LatencyPredictor.build(CostModel.build(analysis), fits, start_ms=10.0)
        half = {g.index: g.channels // 2 for g in analysis.prunable_groups()}
        predictions.append((len(predictor.fits), predictor.ms(half)))
    assert predictions[1][0] == predictions[0][0] > 0
    assert predictions[1][1] == pytest.approx(predictions[0][1])


def stepped_fit(layer, steps: dict):
    """A fit of synthetic timings stepping at `steps[layer.name]` channels (1: none)."""
    k_in, k_out = lm.sample_counts(layer.c_in, layer.c_out)
    multiple = steps.get(layer.name, 1)
    return lm.fit_layer(layer.name, layer.c_in, layer.c_out, k_in, k_out,
                        synthetic_ms(k_in, k_out, layer.c_in, layer.c_out, multiple))


def test_round_to_auto_takes_the_multiple_a_layer_s_timings_step_at(mnist):
    """layer3/conv1 steps at 16: the groups it reads (32 channels) and writes (64) are rounded to 16; the
    groups only step-free layers touch to 1; a step of 4 allows 4."""
    sources = {g.index: {s.node.name for s in g.sources} for g in mnist.prunable_groups()}
    by_source = {name: g for g, names in sources.items() for name in names}
    written, read = by_source["/layer3/conv1/Conv"], by_source["/layer2/conv2/Conv"]
    for step, expected in ((16, 16), (4, 4)):
        fits = [stepped_fit(layer, {"/layer3/conv1/Conv": step}) for layer in lm.timed_layers(mnist)]
        multiples = LatencyPredictor.build(CostModel.build(mnist), fits, start_ms=10.0).favoured_multiples()
        assert multiples[written] == multiples[read] == expected
        assert all(m == 1 for g, m in multiples.items() if g not in (written, read))


@pytest.mark.parametrize("builder, kinds", [
    ("depthwise", {"dense", "depthwise"}),
    ("lstm_states_peepholes", {"dense", "recurrent"}),
    ("lstm_bidirectional_stacked", {"dense", "recurrent"}),
    ("grouped", {"dense"}),
])
def test_depthwise_grouped_and_recurrent_layers_are_timed_alone_and_predicted(builder, kinds):
    from tests.ops import test_conv, test_recurrent

    model = {**test_conv.BUILDERS, **test_recurrent.BUILDERS}[builder]()
    analysis = analyze_model(load(model, {}))
    layers = lm.timed_layers(analysis)
    assert {layer.kind for layer in layers} == kinds
    for layer in layers:
        k_in, k_out = lm.sample_counts(layer.c_in, layer.c_out, layer.kind, layer.blocks)
        for a, b in zip(k_in[:3], k_out[:3]):
            feed = {"x": np.ones(layer.input_shape_at(int(a)), np.float32)}
            y = session(lm.layer_model(layer, int(a), int(b))).run(None, feed)[0]
            assert y.shape[{"Conv": 1, "LSTM": 3}.get(layer.op, -1)] == b
    fits = [CountingTimer()(layer, 1) for layer in layers]
    predictor = LatencyPredictor.build(CostModel.build(analysis), fits, start_ms=10.0)
    assert len(predictor.fits) == len(layers)
    full = {g.index: g.channels for g in analysis.prunable_groups()}
    assert (builder == "grouped") == any(layer.blocks == 2 for layer in layers)
    for fit, layer in ((f, layer) for f, layer in zip(fits, layers) if f.kind != "dense" or layer.blocks > 1):
        group = next(g for g, c in full.items() if c == fit.c_out // layer.blocks)  # a grouped conv's units
        # are its blocks' j-th channels; its prediction moves with them
        alone = LatencyPredictor.build(CostModel.build(analysis), [fit], start_ms=10.0)
        assert alone.ms({**full, group: full[group] // 2}) < 10.0 == alone.ms(full)


def test_a_recurrent_fit_has_the_units_twice():
    k_in, k_out = lm.sample_counts(64, 96, "recurrent")
    ms = 0.1 + 1.0 * (k_in / 64) * (k_out / 96) + 0.5 * (k_out / 96) ** 2
    fit = lm.fit_layer("lstm", 64, 96, k_in, k_out, ms, "recurrent")
    np.testing.assert_allclose(fit.predict(np.array([20, 64]), np.array([33, 50])),
                               0.1 + np.array([20 / 64 * 33 / 96, 50 / 96]) + 0.5 * np.array([33, 50]) ** 2 / 96 ** 2,
                               rtol=1e-6)
    k, same = lm.sample_counts(32, 32, "depthwise")
    assert (k == same).all() and len(k) >= 6  # a depthwise layer's outputs follow its inputs


def test_a_layer_alone_keeps_its_integer_constants_as_they_are():
    """An LSTM's sequence_lens is timed as given: random lengths (0 here) would time no step at all."""
    import onnx
    from onnx import numpy_helper

    from tests.ops.test_recurrent import BUILDERS, STEPS

    model = BUILDERS["lstm_states_peepholes"]()
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    node.input[4] = "lengths"
    model.graph.initializer.append(numpy_helper.from_array(np.array([STEPS], np.int32), "lengths"))
    [layer] = [l for l in lm.timed_layers(analyze_model(load(model, {}))) if l.op == "LSTM"]
    alone = lm.layer_model(layer, layer.c_in // 2, layer.c_out // 2)
    lengths = next(t for t in alone.graph.initializer if t.data_type == onnx.TensorProto.INT32)
    assert numpy_helper.to_array(lengths).tolist() == [STEPS]
    y = session(alone).run(None, {"x": np.ones(layer.input_shape_at(layer.c_in // 2), np.float32)})[0]
    assert np.abs(y).min() > 0  # every step ran (past a sequence's length Y is zero)


def test_round_to_auto_keeps_a_blocked_layer_s_channels_at_its_block(mnist):
    """Step-free timings round to 1, but a layer onnxruntime runs blocked at multiples of 4 keeps the groups
    it reads and writes at 4 at least."""
    layers = lm.timed_layers(mnist)
    blocked = "/layer3/conv1/Conv"
    fits = [replace(stepped_fit(layer, {}), block=4 if layer.name == blocked else 1) for layer in layers]
    multiples = LatencyPredictor.build(CostModel.build(mnist), fits, start_ms=10.0).favoured_multiples()
    sources = {g.index: {s.node.name for s in g.sources} for g in mnist.prunable_groups()}
    by_source = {name: g for g, names in sources.items() for name in names}
    assert multiples[by_source[blocked]] == multiples[by_source["/layer2/conv2/Conv"]] == 4
    assert sorted(set(multiples.values())) == [1, 4]


def test_a_layer_s_block_is_the_multiple_at_which_onnxruntime_keeps_it_blocked(mnist):
    """Measured on this machine's onnxruntime: a Conv that runs blocked at full size has a block > 1 at whose
    multiples it stays blocked and at an odd count below which it does not; the Gemm head is never blocked."""
    layers = {layer.name: layer for layer in lm.timed_layers(mnist)}
    conv = layers["/layer3/conv1/Conv"]
    if not lm.runs_blocked(lm.layer_model(conv, conv.c_in, conv.c_out)):
        pytest.skip("this onnxruntime runs no Conv in a blocked layout")
    block = lm.layer_block(conv)
    assert block > 1
    assert lm.runs_blocked(lm.layer_model(conv, conv.c_in - block, conv.c_out - block))
    assert not lm.runs_blocked(lm.layer_model(conv, conv.c_in - 1, conv.c_out - 1))
    assert lm.layer_block(next(layer for layer in layers.values() if layer.op == "Gemm")) == 1


def test_a_layer_too_narrow_for_its_block_is_timed_at_every_count_and_never_at_zero_channels(monkeypatch):
    """A 3->32 Conv onnxruntime runs blocked in fours: three input channels are fewer than MIN_UNITS blocks,
    so it is timed at plain counts (no zero-channel or over-wide input); a 64->64 one in units of 4."""
    from tests.builders import Builder

    b = Builder(0)
    b.output(b.conv("wide", b.conv("stem", "x", 3, 32), 32, 64))
    analysis = analyze_model(load(b.model([("x", [1, 3, 16, 16], 1)], name="narrow"), {}))
    monkeypatch.setattr(lm, "layer_block", lambda layer: 4)
    timed = []
    monkeypatch.setattr(lm, "time_runs", lambda sessions, feed, timing, clock: timed.append(feed["x"].shape[1])
                        or {"layer": np.full(3, 1e-3)})
    for layer in lm.timed_layers(analysis):
        timed.clear()
        fit = lm.time_layer(layer, 1)
        assert fit.block == 4 and all(0 < c <= layer.c_in for c in timed)
        if layer.c_in >= 4 * lm.MIN_UNITS:
            assert all(c % 4 == 0 or c == layer.c_in for c in timed)


def chained_model():
    """conv1 -> BatchNormalization -> hard swish (x * clip(x + 3, 0, 6) / 6) -> per-channel Mul, read by conv2
    and by an Add that mixes it into conv2's Relu output (from outside conv2's chain) -> Sigmoid -> conv3;
    analysed as written (`simplify=False`: the rules would make the hard swish one op)."""
    from tests.builders import Builder

    b = Builder(0)
    x = b.bn("bn", b.conv("conv1", "x", 3, 16), 16)
    clipped = b.node("Clip", "clip", [b.node("Add", "plus3", [x, b.const("three", 3.0)]), b.const("lo", 0.0),
                                      b.const("hi", 6.0)])
    swish = b.node("Div", "div6", [b.node("Mul", "times", [x, clipped]), b.const("six", 6.0)])
    scaled = b.node("Mul", "scale", [swish, b.const("gain", np.linspace(0.5, 1.5, 16).reshape(1, 16, 1, 1))])
    mixed = b.node("Add", "residual", [b.relu("relu", b.conv("conv2", scaled, 16, 16)), scaled])
    b.output(b.conv("conv3", b.node("Sigmoid", "sigmoid", [mixed]), 16, 4))
    return analyze_model(load(b.model([("x", [1, 3, 16, 16], 1)], name="chained"), {}, simplify=False))


def fused_model():
    """conv -> BatchNormalization -> HardSwish -> head: a chain onnxruntime fuses whole into the conv."""
    from tests.builders import Builder

    b = Builder(0)
    b.output(b.conv("head", b.node("HardSwish", "hswish", [b.bn("bn", b.conv("conv", "x", 3, 16), 16)]), 16, 4))
    return analyze_model(load(b.model([("x", [1, 3, 16, 16], 1)], name="fused"), {}))


def test_a_conv_is_timed_with_its_batch_norm_and_hard_swish_chain():
    layers = {layer.name: layer for layer in lm.timed_layers(chained_model())}
    conv1 = layers["conv1"]
    assert [step.op for step in conv1.chain] == ["BatchNormalization", "Add", "Clip", "Mul", "Div", "Mul"]
    assert conv1.chain[3].inputs == (1, 3)  # x * clip(x + 3): two tensors of the chain
    assert conv1.ends == (6,)  # only the last is read outside; the Clip bounds are kept as they are
    assert [c[2] for c in conv1.chain[2].inputs[1:]] == [(0.0,), (6.0,)]
    model = lm.layer_model(conv1, 3, 8)
    assert [n.op_type for n in model.graph.node] == ["Conv", *(step.op for step in conv1.chain), "Slice"]
    [y] = session(model).run(None, {"x": np.ones(conv1.input_shape_at(3), np.float32)})
    assert y.shape == (1, 8, 16, 1) and np.isfinite(y).all()  # the end is read by a Slice of one column


def test_onnxruntime_fuses_a_chain_s_activation_into_its_conv_as_in_the_whole_model():
    """A graph output blocks onnxruntime's fusion (Conv + HardSwish stayed Conv, HardSigmoid, Mul): the end of a
    chain is read by a Slice instead, and the timed Conv runs with its BatchNormalization folded and its
    activation fused, as where the next layer reads it."""
    import onnxruntime as ort

    conv = lm.timed_layers(fused_model())[0]
    assert [step.op for step in conv.chain] == ["BatchNormalization", "HardSwish"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(lm.layer_model(conv, 3, 8).SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    ops = [n.op_type for n in optimized.graph.node]
    assert "BatchNormalization" not in ops and "HardSwish" not in ops and "HardSigmoid" not in ops, ops


def test_a_chain_onnxruntime_fuses_whole_into_its_conv_is_not_timed_with_it(monkeypatch):
    """Conv + BatchNormalization + HardSwish runs as one fused Conv: timed alone (the chain made the rotation
    classifier's predicted speed-up overshoot); an unfused hard-swish chain is timed with its conv."""
    fused = lm.timed_layers(fused_model())[0]
    conv1 = next(layer for layer in lm.timed_layers(chained_model()) if layer.name == "conv1")
    assert fused.chain and lm.unfused(fused).chain == () and lm.unfused(fused).ends == (0,)
    assert lm.unfused(conv1) == conv1
    timed = []
    monkeypatch.setattr(lm, "latency_session", lambda model, threads: timed.append(model) or model)
    monkeypatch.setattr(lm, "time_runs", lambda sessions, feed, timing, clock: {"layer": np.full(3, 1e-3)})
    lm.time_layer(fused, 1)
    assert timed and all([n.op_type for n in model.graph.node] == ["Conv"] for model in timed)


def test_a_chain_onnxruntime_cannot_build_leaves_its_layer_timed_alone(monkeypatch):
    conv1 = next(layer for layer in lm.timed_layers(chained_model()) if layer.name == "conv1")

    def fails(model):
        raise RuntimeError("onnxruntime refused the chain")

    monkeypatch.setattr(lm, "optimized", fails)
    assert lm.unfused(conv1).chain == () and lm.unfused(conv1).name == "conv1"


def test_a_chain_stops_at_a_node_fed_from_outside_it():
    """conv2's Relu is its chain; the Add mixes in conv1's chain, so neither it nor the Sigmoid after it join."""
    conv2 = next(layer for layer in lm.timed_layers(chained_model()) if layer.name == "conv2")
    assert [step.op for step in conv2.chain] == ["Relu"] and conv2.ends == (1,)


def test_the_time_fitted_is_the_layer_s_with_its_chain(monkeypatch):
    conv1 = next(layer for layer in lm.timed_layers(chained_model()) if layer.name == "conv1")
    timed = []
    monkeypatch.setattr(lm, "latency_session", lambda model, threads: timed.append(model) or model)
    monkeypatch.setattr(lm, "time_runs", lambda sessions, feed, timing, clock:
                        {"layer": np.full(3, 1e-3 * len(sessions["layer"].graph.node))})  # 1 ms a node
    fit = lm.time_layer(conv1, 1)
    assert timed and all(len(model.graph.node) == 8 for model in timed)  # the conv, its chain and the Slice
    assert fit.predict(conv1.c_in, conv1.c_out) == pytest.approx(8.0)


def test_the_cache_key_changes_with_the_chain():
    layers = lm.timed_layers(chained_model())
    keys = {lm.cache_key(layers, 1), lm.cache_key([replace(layer, chain=(), ends=(0,)) for layer in layers], 1)}
    conv1 = layers[0]
    steps = list(conv1.chain)
    steps[2] = replace(steps[2], inputs=(2, ((), "float32", (0.0,)), ((), "float32", (4.0,))))  # clip at 4
    keys.add(lm.cache_key([replace(conv1, chain=tuple(steps)), *layers[1:]], 1))
    assert len(keys) == 3
