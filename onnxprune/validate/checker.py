"""The ONNX checker on a result, for models in memory or on disk, of any size."""

from __future__ import annotations

import onnx

from ..errors import InternalError, first_line
from ..io import model_size_bytes, serializable
from ..runtime import EXTERNAL_ABOVE_BYTES, on_disk


def _checker_error(model) -> str | None:
    try:
        if isinstance(model, onnx.ModelProto) and serializable(model) and model_size_bytes(model) < EXTERNAL_ABOVE_BYTES:
            onnx.checker.check_model(model, full_check=True)
        else:  # a large model is checked from a file with external data: the checker reads no weights then
            with on_disk(model, copy_mapped=True) as path:  # the checker refuses linked data files
                onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return first_line(exc)
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
