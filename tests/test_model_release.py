"""A large model from a file is not held parsed while its activations are captured: the capture passes
read the file, the graphsurgeon graph holds no part of the proto, and the proto is parsed again after
scoring. The results are the same, bit for bit, as when the proto is kept."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxprune import PruneConfig, loading, prune
from onnxprune.baseline import prepare
from onnxprune.calib import CalibrationSet, capture
from onnxprune.calib.capture import output_suffix, probe_file, stream_activations
from onnxprune.runtime import with_outputs
from onnxprune.io import ModelFile, load_model, load_model_file
from onnxprune.loading import detach_constants, load, released_model
from onnxprune.stages import analyze_model
from tests import models


def _calibration(count: int = 6, seed: int = 0) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((count, 3, 16, 16)).astype(np.float32)}


def _saved(model: onnx.ModelProto, tmp_path, name: str = "model.onnx") -> str:
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def _with_constant_node(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its first initializer given by a Constant node instead (normalising folds it)."""
    first = model.graph.initializer[0]
    node = helper.make_node("Constant", [], [first.name], value=first)
    model.graph.node.insert(0, node)
    del model.graph.initializer[0]
    return model


@pytest.mark.parametrize("scorer", ["pfp", "activation"])
def test_no_parsed_model_is_held_during_capture_and_it_is_parsed_again_after(tmp_path, monkeypatch, scorer):
    path = _saved(models.residual(), tmp_path)
    monkeypatch.setattr(loading, "RELOAD_ABOVE_BYTES", 0)
    baseline = prepare(path, PruneConfig(calibration=_calibration()))
    seen = []
    stream = capture.stream_activations
    module = importlib.import_module(f"onnxprune.scoring.{scorer}")

    def streamed(model, *args, **kwargs):  # what the scorer hands to the capture, and what is held meanwhile
        for batch in stream(model, *args, **kwargs):
            seen.append((baseline.loaded.model, model))
            yield batch

    monkeypatch.setattr(module, "stream_activations", streamed)
    result = prune(baseline, PruneConfig(calibration=_calibration(), scorer=scorer, filters=0.5))
    assert seen and all(model is None for model, _ in seen)
    assert all(isinstance(source, ModelFile) and source.verbatim for _, source in seen)
    assert baseline.loaded.model.SerializeToString() == load_model(path).SerializeToString()
    assert result.report["after"]["params"] < result.report["before"]["params"]


@pytest.mark.parametrize("scorer", ["pfp", "wanda"])
def test_releasing_the_model_changes_no_result(tmp_path, monkeypatch, scorer):
    path = _saved(models.residual_downsample(), tmp_path)
    config = PruneConfig(calibration=_calibration(), scorer=scorer, filters=0.5)
    kept = prune(path, config)
    monkeypatch.setattr(loading, "RELOAD_ABOVE_BYTES", 0)
    released = prune(path, config)
    assert released.model.SerializeToString() == kept.model.SerializeToString()
    assert released.plan.to_json() == kept.plan.to_json()
    assert released.report["fidelity"] == kept.report["fidelity"]


def test_a_model_that_needs_normalising_is_parsed_again_for_capture(tmp_path, monkeypatch):
    """A file whose parse is not the normalised model (here a Constant node) is not read verbatim: the
    capture reads the normalised model, and the results match those with the proto kept."""
    path = _saved(_with_constant_node(models.residual()), tmp_path)
    assert not load_model_file(path)[2].verbatim
    config = PruneConfig(calibration=_calibration(), scorer="pfp", filters=0.5)
    kept = prune(path, config)
    monkeypatch.setattr(loading, "RELOAD_ABOVE_BYTES", 0)
    assert prune(path, config).model.SerializeToString() == kept.model.SerializeToString()


def test_the_model_is_parsed_again_when_scoring_fails(tmp_path, monkeypatch):
    path = _saved(models.residual(), tmp_path)
    monkeypatch.setattr(loading, "RELOAD_ABOVE_BYTES", 0)
    loaded = load(path)
    analysis = analyze_model(loaded)
    with pytest.raises(RuntimeError):
        with released_model(loaded, analysis.graph) as source:
            assert loaded.model is None and isinstance(source, ModelFile)
            raise RuntimeError("scoring failed")
    assert loaded.model.SerializeToString() == load_model(path).SerializeToString()


def test_a_detached_graph_holds_no_part_of_the_model():
    """Changing every tensor of the model after detaching changes nothing the graph exports."""
    model = models.residual()
    loaded = load(model)
    analysis = analyze_model(loaded)
    analysis.graph.nodes[0].inputs[1].values  # one constant loaded, the others still lazy
    expected = gs.export_onnx(analysis.graph.copy())
    detach_constants(analysis.graph)
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(np.zeros(1, np.float32), "changed"))
    del model.opset_import[:]
    exported = gs.export_onnx(analysis.graph)
    assert [t.SerializeToString() for t in exported.graph.initializer] == \
        [t.SerializeToString() for t in expected.graph.initializer]
    assert list(exported.opset_import) == list(expected.opset_import)


def test_a_verbatim_file_with_the_outputs_appended_parses_to_the_model_with_those_outputs(tmp_path):
    model = models.residual()
    path = _saved(model, tmp_path)
    names = [model.graph.output[0].name] + [n.output[0] for n in model.graph.node][:3]
    with with_outputs(model, names) as probe:
        expected = probe.SerializeToString()
    source = load_model_file(path)[2]
    assert source.verbatim and source.outputs == tuple(o.name for o in model.graph.output)
    with probe_file(source, names) as probe_path:
        appended = onnx.load(str(probe_path))
    assert appended.SerializeToString() == expected
    assert output_suffix([], ()) == b""


def test_capture_from_a_file_matches_capture_from_the_proto(tmp_path):
    model = models.residual()
    names = [n.output[0] for n in model.graph.node][:4]
    data = CalibrationSet(_calibration(3))
    expected = [dict(b) for b in stream_activations(model, names, data, batch_size=1)]
    for path in (_saved(model, tmp_path, "plain.onnx"), _saved(_with_constant_node(models.residual()), tmp_path)):
        source = load_model_file(path)[2]
        got = [dict(b) for b in stream_activations(source, names, data, batch_size=1)]
        assert len(got) == len(expected) == 3
        for a, e in zip(got, expected):
            assert all(a[n].tobytes() == e[n].tobytes() for n in names)


def test_each_batch_is_emptied_when_the_next_is_asked_for():
    model = models.residual()
    names = [n.output[0] for n in model.graph.node][:2]
    batches = stream_activations(model, names, CalibrationSet(_calibration(2)), batch_size=1)
    first = next(batches)
    assert set(first) == set(names)
    second = next(batches)
    assert first == {} and set(second) == set(names)
