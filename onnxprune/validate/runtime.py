"""onnxruntime sessions and the ONNX checker, for models in memory or on disk, of any size.

Sessions are always built from a file, a model in memory being written to a temporary one first:
onnxruntime's Python wrapper keeps the bytes it was given for the whole life of the session (a second
copy of every weight, ~100 MB for a ResNet-50), while writing the file costs ~0.05 s per 100 MB.
"""

from __future__ import annotations

import ctypes
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
    return build_session(model, options)


def build_session(model: onnx.ModelProto | str | os.PathLike, options: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session for `model`, read from its file (see the module docstring)."""
    with on_disk(model) as path:
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    release_free_memory()  # onnxruntime's working copies of the weights while it optimized the graph
    return sess


def release_free_memory() -> None:
    """Hand memory freed by onnxruntime back to the OS (glibc keeps it otherwise), so the next large
    allocation does not come on top of it. A no-op where glibc is not the C library."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _checker_error(model) -> str | None:
    try:
        if isinstance(model, onnx.ModelProto) and model_size_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model, full_check=True)
        else:
            with on_disk(model) as path:
                onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return str(exc).strip().splitlines()[0]
    return None


def check_model(model, original=None) -> dict:
    """onnx.checker with full_check. A failure on our output is a bug (InternalError) unless the
    original fails the checker as well (some exporters emit ops the checker refuses but onnxruntime
    runs): then the result says so and validation relies on onnxruntime."""
    error = _checker_error(model)
    if error is None:
        return {"passed": True}
    original_error = _checker_error(original) if original is not None else None
    if original_error is None:
        raise InternalError(f"the pruned model fails the ONNX checker: {error}")
    return {"passed": False, "error": error, "note": f"the input model fails the checker too: {original_error}"}
