"""Capture sessions are built from a temporary file, not from the serialized model: the same outputs bit
for bit as a session built from the bytes, the model left as it was, and no serialized copy of the model
kept alive by the session (onnxruntime's Python wrapper holds on to bytes it is given)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxprune import io
from onnxprune.calib import CalibrationSet
from onnxprune.calib.capture import capture_session, stream_activations
from onnxprune.runtime import with_outputs
from onnxprune.io import load_model
from onnxprune.runtime import session
from tests import models


def _inner(model: onnx.ModelProto) -> list[str]:
    return [node.output[0] for node in model.graph.node][:4]


def _from_bytes(model: onnx.ModelProto) -> ort.InferenceSession:
    """The session as capture built it before: from the serialized model, same options."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _outputs(model: onnx.ModelProto, names: list[str], build) -> list[np.ndarray]:
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with with_outputs(model, names) as probe:
        sess = build(probe)
    return sess.run(names, {"x": x})


def _assert_same(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def test_capture_session_matches_a_session_from_the_bytes_and_leaves_the_model_as_it_was():
    model = models.residual()  # BatchNormalization: onnxruntime fuses it, on both paths alike
    before = model.SerializeToString()
    names = _inner(model)
    _assert_same(_outputs(model, names, capture_session), _outputs(model, names, _from_bytes))
    assert model.SerializeToString() == before


def test_sessions_keep_no_serialized_copy_of_the_model():
    model = models.conv_bn_relu()
    for sess in (capture_session(model), session(model)):
        assert getattr(sess, "_model_bytes", None) is None


def test_stream_activations_matches_runs_of_a_session_from_the_bytes():
    model = models.residual()
    names = _inner(model)
    x = np.random.default_rng(1).standard_normal((3, 1, 3, 16, 16)).astype(np.float32)
    with with_outputs(model, names) as probe:
        reference = _from_bytes(probe)
    expected = [reference.run(names, {"x": sample}) for sample in x]
    streamed = [dict(b) for b in stream_activations(model, names, CalibrationSet({"x": x.reshape(3, 3, 16, 16)}),
                                                   batch_size=1)]
    assert len(streamed) == 3
    for batch, outputs in zip(streamed, expected):
        _assert_same([batch[name] for name in names], outputs)


def test_models_over_the_size_limit_go_through_external_data_with_the_same_outputs():
    model = models.residual()
    names = _inner(model)
    expected = _outputs(model, names, _from_bytes)
    with mock.patch.object(io, "EXTERNAL_DATA_THRESHOLD", 0):  # as if the model were over 2 GB
        _assert_same(_outputs(model, names, capture_session), expected)
    reference = models.residual()
    assert [o.name for o in model.graph.output] == [o.name for o in reference.graph.output]
    for tensor, original in zip(model.graph.initializer, reference.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(original))


def test_a_model_with_external_data_captures_like_one_without(tmp_path):
    model = models.residual()
    path = tmp_path / "external.onnx"
    onnx.save_model(models.residual(), str(path), save_as_external_data=True, location="external.onnx.data",
                    size_threshold=0)
    loaded = load_model(path)
    names = _inner(model)
    _assert_same(_outputs(loaded, names, capture_session), _outputs(model, names, _from_bytes))


def test_run_batches_fit_the_memory_budget():
    """Validation and reference runs: the model's fixed batch when it has one, else as many samples as keep
    four of its largest tensors within RUN_BUDGET_BYTES, between 1 and RUN_BATCH."""
    from onnxprune.calib.data import InputSpec, fixed_batch
    from onnxprune.runtime import MAX_BATCH as RUN_BATCH, RUN_BUDGET_BYTES, run_batch_size

    dynamic = [InputSpec("x", np.float32, [None, 3, 224, 224], [1, 3, 224, 224])]
    fixed = [InputSpec("x", np.float32, [4, 3, 224, 224], [4, 3, 224, 224])]
    per_sample = RUN_BUDGET_BYTES // (4 * 4 * 10)  # elements of a tensor of which ten samples fit
    shapes = {"x": (None, 3, 224, 224), "big": (None, per_sample), "unknown": (None, "n", 8)}
    assert run_batch_size(fixed_batch(dynamic)) == RUN_BATCH
    assert run_batch_size(fixed_batch(dynamic), shapes) == 10
    assert run_batch_size(fixed_batch(dynamic), {"huge": (1, RUN_BUDGET_BYTES)}) == 1
    assert run_batch_size(fixed_batch(dynamic), {"small": (1, 8)}) == RUN_BATCH
    assert run_batch_size(fixed_batch(fixed), shapes) == 4
