"""The int8 hand-off: the pruned model quantized by onnxruntime's own tool, never by onnxprune.

`onnxruntime.quantization.quant_pre_process` (shape inference and onnxruntime's graph optimizations: a
BatchNormalization is folded into the Conv before it), then `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs around the
float ops, which onnxruntime fuses into int8 kernels), int8 weights per output channel and int8
activations whose ranges (MinMax) come from our calibration data through its `CalibrationDataReader`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ..calib import CalibrationSet
from ..errors import ModelError, UsageError
from ..io import write_model
from ..workdir import temp_folder

log = logging.getLogger(__name__)

FORMATS = ("int8",)


def check_quantize(value: str | None) -> None:
    if value is not None and value not in FORMATS:
        raise UsageError(f"--quantize {value!r}: choose {' or '.join(FORMATS)}")


def quantize_int8(model: onnx.ModelProto, calibration: CalibrationSet, batch_size: int) -> tuple[onnx.ModelProto, dict]:
    """`model` quantized to int8 (QDQ, weights per channel), and the report's `quantize` settings."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # our calibration data, one batch per call
        def __init__(self):
            self.batches = calibration.batches(batch_size)

        def get_next(self):
            return next(self.batches, None)

    reader = Reader()
    with temp_folder("quantize-") as folder:
        source, prepared, target = (Path(folder) / name for name in ("in.onnx", "prepared.onnx", "out.onnx"))
        write_model(model, source)  # as the output is written: past 2 GB with its tensors beside it
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # ONNX shapes, and onnxruntime's fusions (BatchNorm into Conv)
            quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        except Exception as exc:  # onnxruntime's tool raises plain exceptions for models it cannot handle
            raise ModelError(f"onnxruntime's quantization failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
                             "run without --quantize, or quantize the written model with onnxruntime yourself") from None
        quantized = onnx.load_model(str(target))
    settings = {"format": "QDQ", "weights": "int8 per channel", "activations": "int8 per tensor", "calibrate_method": "MinMax",
                "samples": calibration.count, "tool": "onnxruntime.quantization.quantize_static"}
    log.info("int8: quantized with onnxruntime's quantize_static on %d samples", calibration.count)
    return quantized, settings


__all__ = ["FORMATS", "check_quantize", "quantize_int8"]
