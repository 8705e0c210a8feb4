"""onnxruntime sessions and the ONNX checker, for models in memory or on disk, of any size."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import InternalError
from ..io import EXTERNAL_DATA_THRESHOLD, model_size_bytes, write_model


@contextmanager
def on_disk(model: onnx.ModelProto | str | os.PathLike):
    """A path to the model: as given, or a temporary file (with external data when large)."""
    if not isinstance(model, onnx.ModelProto):
        yield Path(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_model(model, path)
        yield path


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto) and model_size_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with on_disk(model) as path:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_model(model: onnx.ModelProto | str | os.PathLike) -> None:
    """onnx.checker with full_check; a failure on our output is a bug, not bad input."""
    try:
        if isinstance(model, onnx.ModelProto) and model_size_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model, full_check=True)
        else:
            with on_disk(model) as path:
                onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the pruned model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
