"""The int8 hand-off: the pruned model quantized by onnxruntime's own tool, never by onnxprune.

`onnxruntime.quantization.quant_pre_process` (shape inference and onnxruntime's graph optimizations: a
BatchNormalization is folded into the Conv before it), then `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs around the
float ops, which onnxruntime fuses into int8 kernels), int8 weights per output channel and int8
activations whose ranges (MinMax) come from our calibration data through its `CalibrationDataReader`.
Nodes matching `--quantize-exclude` stay float (`quantize_static`'s `nodes_to_exclude`).

Which layers lose most is measured with onnxruntime's `qdq_loss_debug` helpers on DEBUG_SAMPLES samples:
every quantized activation of the int8 model against the float model's (signal-to-quantization-noise
ratio in dB, lower is worse, the error accumulated from the input on); the report lists the WORST
tensors with the nodes that make them, the names to give `--quantize-exclude`.
"""

from __future__ import annotations

import fnmatch
import logging
from contextlib import contextmanager
from pathlib import Path

import onnx

from ..calib import CalibrationSet
from ..errors import ModelError, UsageError, first_line
from ..io import write_model
from ..workdir import temp_folder

log = logging.getLogger(__name__)

FORMATS = ("int8",)
DEBUG_SAMPLES = 8
WORST = 5


def check_quantize(value: str | None) -> None:
    if value is not None and value not in FORMATS:
        raise UsageError(f"--quantize {value!r}: choose {' or '.join(FORMATS)}")


def quantize_int8(model: onnx.ModelProto, calibration: CalibrationSet, batch_size: int,
                  exclude: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """`model` quantized to int8 (QDQ, weights per channel), nodes matching the `exclude` globs left float,
    and the report's `quantize` settings (with the layers that lose most)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # our calibration data, one batch per call
        def __init__(self, data=calibration):
            self.batches = data.batches(batch_size)

        def get_next(self):
            return next(self.batches, None)

    reader = Reader()
    with temp_folder("quantize-") as folder:
        source, prepared, target = (Path(folder) / name for name in ("in.onnx", "prepared.onnx", "out.onnx"))
        write_model(model, source)  # as the output is written: past 2 GB with its tensors beside it
        with refused_as_model_error():
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # ONNX shapes, and onnxruntime's fusions (BatchNorm into Conv)
        excluded = excluded_nodes(onnx.load_model(str(prepared), load_external_data=False), exclude)
        with refused_as_model_error():
            quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        quantized = onnx.load_model(str(target))
        worst = worst_layers(prepared, target, Path(folder), lambda: Reader(calibration.head(min(DEBUG_SAMPLES, calibration.count))))
    settings = {"format": "QDQ", "weights": "int8 per channel", "activations": "int8 per tensor", "calibrate_method": "MinMax",
                "samples": calibration.count, "tool": "onnxruntime.quantization.quantize_static",
                "excluded_nodes": excluded, "worst_layers": worst}
    log.info("int8: quantized with onnxruntime's quantize_static on %d samples", calibration.count)
    return quantized, settings


@contextmanager
def refused_as_model_error():
    """onnxruntime's tool raises plain exceptions for models it cannot handle: a one-line ModelError."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"onnxruntime's quantization failed ({first_line(exc)}): "
                         "run without --quantize, or quantize the written model with onnxruntime yourself") from None


def excluded_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """Names of the nodes matching the globs; a UsageError for a glob that matches none."""
    names = [node.name for node in model.graph.node if node.name]
    excluded = []
    for pattern in patterns:
        found = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not found:
            raise UsageError(f"--quantize-exclude {pattern!r} matches no node of the model to quantize: give node "
                             "names (or globs) as the report's quantize.worst_layers lists them")
        excluded += [name for name in found if name not in excluded]
    return excluded


def worst_layers(float_path: Path, qdq_path: Path, folder: Path, reader) -> list[dict] | str:
    """The WORST quantized activations by SQNR (dB) against the float model, with their producing nodes
    (`qdq_loss_debug`); `reader()` makes a fresh CalibrationDataReader. A failure of those helpers is said
    in the report, not raised: the quantized model itself is fine."""
    from onnxruntime.quantization import qdq_loss_debug as debug

    try:
        activations = []
        for path in (float_path, qdq_path):
            augmented = folder / f"{path.stem}_debug.onnx"
            debug.modify_model_output_intermediate_tensors(str(path), str(augmented))
            activations.append(debug.collect_activations(str(augmented), reader()))
        errors = debug.compute_activation_error(debug.create_activation_matching(activations[1], activations[0]))
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's debug helpers; the report says why they are absent
        return f"per-layer errors unavailable: {first_line(exc)}"
    producer = {out: node.name for node in onnx.load_model(str(float_path), load_external_data=False).graph.node
                for out in node.output}
    ranked = sorted((float(e["xmodel_err"]), name) for name, e in errors.items() if "xmodel_err" in e)
    return [{"tensor": name, "node": producer.get(name, ""), "sqnr_db": round(sqnr, 2)} for sqnr, name in ranked[:WORST]]


__all__ = ["FORMATS", "check_quantize", "quantize_int8"]
