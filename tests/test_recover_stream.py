"""The recovery streams: walking the models level by level from the kept frontier gives the same fits as
re-running the models from their inputs at every level (the old, depth-squared way), keeps per-batch
tensors whatever their layout, and spills to disk past the memory budget without changing anything."""

import numpy as np
import onnx
import pytest

from onnxprune import PruneConfig, prune
from onnxprune.calib import CalibrationSet
from onnxprune.calib.capture import stream_activations
from onnxprune.recover import passes
from onnxprune.recover.stream import ActivationStore, Stream

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_resnet.onnx"
MNIST_CALIB = ROOT / "models" / "mnist_calib.npz"


def _rerun_from_inputs(pruned, original, members, fits, pool):
    """The reference: both whole models run from their inputs for this level, the fits fed in order."""
    own = list(dict.fromkeys(n for v in members for n in (v.input, v.output)))
    targets = list(dict.fromkeys(v.output for v in members))
    inputs = [i.name for i in pruned.model.graph.input if pruned.store.has(i.name)]
    batch = pruned.store.get(0, inputs[0]).shape[0]
    data = CalibrationSet({name: np.concatenate([pruned.store.get(b, name) for b in range(pruned.batches)])
                           for name in inputs})
    acts = [dict(a) for a in stream_activations(pruned.model, own, data, batch)]
    refs = [dict(r) for r in stream_activations(original.model, targets, data, batch)]
    for a, r in zip(acts, refs):
        for view, fit in zip(members, fits):
            fit.add(a[view.input], a[view.output], r[view.output])


def _weights(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.usefixtures("float64_products")
def test_the_streams_fit_the_same_weights_as_rerunning_every_level(monkeypatch):
    config = PruneConfig(filters=0.5, scorer="l1", calibration=str(MNIST_CALIB), calib_samples=96, seed=3)
    streamed = prune(str(MNIST), config)
    monkeypatch.setattr(passes, "accumulate", _rerun_from_inputs)
    rerun = prune(str(MNIST), config)
    assert streamed.report["recovery"]["recovered"] == rerun.report["recovery"]["recovered"] > 3
    assert streamed.report["recovery"]["levels"] > 3
    a, b = _weights(streamed.model), _weights(rerun.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def _model_with_shape_tensor():
    """x -> Relu -> Shape -> (used by Reshape much later): a frontier tensor without a batch axis."""
    h = onnx.helper
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Shape", ["r"], ["s"]),
             h.make_node("Neg", ["r"], ["n"]), h.make_node("Reshape", ["n", "s"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 3])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 3])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_a_stream_step_by_step_equals_one_run(budget):
    model = _model_with_shape_tensor()
    data = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    stream = Stream(model, CalibrationSet({"x": data}), batch_size=4, budget=budget)
    try:
        first = [dict(b) for b in stream.run(["s"])]  # [2] per batch, no batch axis
        assert [b["s"].tolist() for b in first] == [[4, 3], [4, 3], [2, 3]]
        second = [dict(b) for b in stream.run(["y"])]
        np.testing.assert_array_equal(np.concatenate([b["y"] for b in second]), -np.maximum(data, 0))
        assert not stream.store.arrays  # nothing is left that no node still needs
    finally:
        stream.close()


def test_provisional_nodes_run_again_with_their_new_weights():
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.full((3, 3), 2.0, np.float32), "w")
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("MatMul", ["r", "w"], ["m"]), h.make_node("Neg", ["m"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 3])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 3])], initializer=[w])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    data = np.ones((2, 3), np.float32)
    stream = Stream(model, CalibrationSet({"x": data}), batch_size=2)
    (step,) = list(stream.run(["r", "m"], provisional=frozenset({1})))
    np.testing.assert_array_equal(step["m"], np.full((2, 3), 6.0))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32), "w"))
    (last,) = list(stream.run(["y"]))
    np.testing.assert_array_equal(last["y"], -np.ones((2, 3)))
    stream.close()


def test_the_store_spills_past_its_budget_and_cleans_up():
    store = ActivationStore(budget=100)
    small, big = np.zeros(10, np.float32), np.arange(1000, dtype=np.float32)
    store.put(0, "a", small)
    store.put(0, "b", big)
    assert isinstance(store.get(0, "b"), np.memmap)
    np.testing.assert_array_equal(store.get(0, "b"), big)
    folder = store.folder.name
    store.close()
    assert not __import__("os").path.exists(folder)


def test_evaluate_runs_one_session_with_the_weights_it_is_given(monkeypatch):
    """`Stream.evaluate` builds one session for any number of calls, uses the weights fed to it even where
    onnxruntime folds a constant weight (a Conv followed by BatchNormalization), hands it the other weights
    as arrays (not copied into the piece), and leaves the stream as it was."""
    from onnxprune.recover import stream as stream_module
    from tests.ops.test_norm import conv_bn_relu

    model = conv_bn_relu()
    data = CalibrationSet({"x": np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)})
    built, plain_session = [], stream_module.short_lived_session
    monkeypatch.setattr(stream_module, "short_lived_session",
                        lambda piece, *shared: built.append(piece) or plain_session(piece, *shared))
    monkeypatch.setattr(stream_module, "SHARED_ABOVE_ELEMENTS", 1)  # every other weight handed over as an array
    stream = Stream(model, data, 1)  # its batch size is fixed
    output = model.graph.output[0].name
    run = stream.evaluate([output], ["conv1.weight"])
    weight = _weights(model)["conv1.weight"]
    for scale in (1.0, 0.5, 0.0):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        next(t for t in changed.graph.initializer if t.name == "conv1.weight").CopyFrom(
            onnx.numpy_helper.from_array(weight * scale, "conv1.weight"))
        expected = [dict(b) for b in stream_activations(changed, [output], data, 1)]
        got = list(run({"conv1.weight": weight * np.float32(scale)}))
        assert len(got) == len(expected) == 3
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g[output], e[output], rtol=1e-5, atol=1e-5)
    assert len(built) == 1
    assert not stream.done.any()
    assert [i.name for i in built[0].graph.input if i.name == "conv1.weight"] == ["conv1.weight"]
    assert "conv1.weight" not in {t.name for t in built[0].graph.initializer}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in built[0].graph.initializer)


def test_evaluate_reads_weights_changed_since_an_earlier_call(monkeypatch):
    """A weight handed over as an array is read when `evaluate` is called: a later call after the model's
    weight changed computes with the new one (as `run` does), not with an array kept from before."""
    from onnxprune.recover import stream as stream_module
    from tests.ops.test_norm import conv_bn_relu

    model = conv_bn_relu()
    data = CalibrationSet({"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)})
    monkeypatch.setattr(stream_module, "SHARED_ABOVE_ELEMENTS", 1)
    stream = Stream(model, data, 1)
    output = model.graph.output[0].name
    before = [b[output] for b in stream.evaluate([output], [])({})]
    tensor = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(tensor)), "conv1.weight"))
    expected = [dict(b)[output] for b in stream_activations(model, [output], data, 1)]
    after = [b[output] for b in stream.evaluate([output], [])({})]
    assert not np.allclose(before[0], expected[0])
    for e, a in zip(expected, after):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_precomputed_tensors_run_once_and_serve_the_later_steps(monkeypatch):
    """`precompute` runs one session over the nodes the names need and keeps them: the later steps asking
    for them build none and get the values a step-by-step stream computes."""
    from onnxprune.recover import stream as stream_module

    built = []
    real_session = stream_module.short_lived_session
    monkeypatch.setattr(stream_module, "short_lived_session",
                        lambda *a, **k: built.append(1) or real_session(*a, **k))
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    stepwise = Stream(_model_with_shape_tensor(), CalibrationSet({"x": x}), 4)
    expected = [[dict(b) for b in stepwise.run([name])] for name in ("r", "s", "y")]
    ahead = Stream(_model_with_shape_tensor(), CalibrationSet({"x": x}), 4)
    built.clear()
    ahead.precompute(["r", "s", "y"])
    assert len(built) == 1
    for name, batches in zip(("r", "s", "y"), expected):
        got = [dict(b) for b in ahead.run([name])]
        assert len(got) == len(batches) == 2
        for g, e in zip(got, batches):
            np.testing.assert_array_equal(g[name], e[name])
    assert len(built) == 1
    partly = Stream(_model_with_shape_tensor(), CalibrationSet({"x": x}), 4)
    partly.precompute(["r"])
    list(partly.run(["y"]))  # the step after reads r: kept for a later step even so
    np.testing.assert_array_equal(next(partly.run(["r"]))["r"], expected[0][0]["r"])


def test_precompute_windows_are_runs_of_levels_within_the_budget(monkeypatch):
    monkeypatch.setattr(passes, "PRECOMPUTED_BYTES", 1000)
    shapes = {"a": (1, 2, 10), "b": (1, 50), "c": (1, 5, 10), "d": (1, 100), "e": (1, "m"), "f": (1, 1),
              "g": (1, 2), "h": (1, 0), "i": (1, -1), "j": (1, 30), "k": (1, 95), "steps": (20, 1, 3)}
    # 4 bytes x 2 samples a value: a 160, b + c 800, d 800, e h i unknown, f 8, g 16, j 240, k 760, steps 480
    targets = {0: ["a"], 1: ["b", "c"], 2: ["d"], 3: ["e"], 4: ["f"], 5: ["g"], 6: ["f"], 7: ["h"], 8: ["i"],
               9: ["j"], 10: ["k"], 11: ["k"], 12: ["steps"], 13: ["steps"], 14: ["steps"]}
    assert passes.precompute_windows(targets, shapes, 2) == {0: ["a", "b", "c"], 4: ["f", "g", "f"], 9: ["j", "k"],
                                                             12: ["steps", "steps"]}


def test_precomputed_tensors_are_dropped_after_their_last_call():
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    stream = Stream(_model_with_shape_tensor(), CalibrationSet({"x": x}), 4)
    stream.precompute(["y", "r", "y"])
    assert stream.store.has("y") and stream.store.has("r") and stream.done.all()
    list(stream.run(["y"]))
    assert stream.store.has("y")  # asked for once more
    list(stream.run(["r"]))
    assert not stream.store.has("r")
    batches = list(stream.run(["y"]))
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), -np.maximum(x, 0))
    assert not stream.store.has("y") and not stream.precomputed


@pytest.mark.parametrize("steps", [["precompute r", "r", "y"], ["r", "precompute r y", "r", "y"]])
def test_precomputed_tensors_still_read_by_later_nodes_stay(steps):
    """Handed out for the last time, a tensor the nodes not yet run read is kept for them; one already
    computed is not computed (nor handed out) again when precomputed."""
    x = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    stream = Stream(_model_with_shape_tensor(), CalibrationSet({"x": x}), 4)
    for step in steps:
        if step.startswith("precompute"):
            stream.precompute(step.split()[1:])
        else:
            got = np.concatenate([b[step] for b in stream.run([step])])
    np.testing.assert_array_equal(got, -np.maximum(x, 0))
    assert not stream.precomputed


@pytest.mark.parametrize("budget, expected", [(passes.PRECOMPUTED_BYTES, 1), (0, 0)])
def test_recovery_precomputes_the_levels_targets_where_they_fit(monkeypatch, budget, expected):
    calls, wanted = [], []
    real_precompute, real_fit_level = Stream.precompute, passes.fit_level
    monkeypatch.setattr(Stream, "precompute", lambda self, names: calls.append(names) or real_precompute(self, names))
    monkeypatch.setattr(passes, "fit_level", lambda pruned, original, members, fits:
                        wanted.extend(passes._targets(members)) or real_fit_level(pruned, original, members, fits))
    monkeypatch.setattr(passes, "PRECOMPUTED_BYTES", budget)
    result = prune(str(MNIST), PruneConfig(filters=0.5, scorer="l1", calibration=str(MNIST_CALIB), calib_samples=64))
    assert result.report["recovery"]["levels"] > 3 and len(calls) == expected
    if expected:  # MNIST's targets for 64 samples: 14 MB, all levels in one go
        assert calls[0] == wanted
