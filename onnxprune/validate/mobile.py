"""Mobile readiness with onnxruntime's own tools: the mobile usability check and the ORT-format conversion.

`check_mobile` runs, on the pruned model, what `python -m onnxruntime.tools.check_onnx_model_mobile_usability`
runs (optimise to the basic level, then estimate how NNAPI and CoreML would partition the graph, as is and
with fixed input shapes), keeping the structured results instead of the log text, and converts the model to
the ORT format with `onnxruntime.tools.convert_onnx_models_to_ort` (fixed optimisation style, the mobile
default). The .ort file is loaded back into onnxruntime and run once to prove it works.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import first_line
from ..io import write_model
from ..workdir import temp_folder

log = logging.getLogger(__name__)

# onnxruntime's checker file for each execution provider it knows (None: NNAPI's own function)
EXECUTION_PROVIDERS = {
    "NNAPI": None,
    "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
    "CoreML MLProgram": "coreml_supported_mlprogram_ops.md",
}
ORT_TOOL_LOGGERS = ("ort_format_model.utils", "ort_format_model", "check_usability", "usability_checker")


@contextlib.contextmanager
def quiet_ort_tools():
    """onnxruntime's tools print and log progress; keep it out of our users' terminals (debug log only)."""
    saved = {name: logging.getLogger(name).level for name in ORT_TOOL_LOGGERS}
    for name in ORT_TOOL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if printed.getvalue().strip():
            log.debug("onnxruntime tools said: %s", printed.getvalue().strip())


def check_mobile(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None) -> tuple[dict, bytes | None]:
    """(report section, .ort file bytes or None when the conversion failed)."""
    _import_ort_tools()  # before quieting: importing them sets their loggers' levels
    with temp_folder("mobile-") as tmp:
        path = pathlib.Path(tmp) / "model.onnx"
        write_model(model, path)
        with quiet_ort_tools():
            usability = usability_report(path, pathlib.Path(tmp) / "optimized")
            ort_section, ort_bytes = convert_to_ort(path, pathlib.Path(tmp) / "ort", feed)
    blocking = sorted({op for ep in usability["execution_providers"].values() for op in ep["unsupported_ops"]})
    report = {**usability, "blocking_ops": blocking, "ort": ort_section}
    report["verdict"] = verdict(report)
    return report, ort_bytes


def _import_ort_tools() -> None:
    import onnxruntime.tools.convert_onnx_models_to_ort  # noqa: F401
    import onnxruntime.tools.mobile_helpers.usability_checker  # noqa: F401


def usability_report(path: pathlib.Path, work_dir: pathlib.Path) -> dict:
    """NNAPI and CoreML partitioning, as onnxruntime's usability checker estimates it."""
    from onnxruntime.tools.mobile_helpers import usability_checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    work_dir.mkdir()
    optimized = work_dir / path.name
    optimize_model(path, optimized, use_external_initializers=True)
    model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    dynamic_inputs, _ = usability_checker.check_shapes(model.graph, logging.getLogger("usability_checker"))
    providers = {}
    for name, config in EXECUTION_PROVIDERS.items():
        def partitions(fixed_sizes, config=config):
            if config is None:
                return usability_checker.check_nnapi_partitions(model, fixed_sizes)
            return usability_checker.check_coreml_partitions(model, fixed_sizes, config)

        as_is = _partition_summary(partitions(True))
        entry = {**as_is}
        if as_is["suitability"] != "YES" and dynamic_inputs:
            entry["with_fixed_shapes"] = _partition_summary(partitions(False))
        entry["unsupported_ops"] = sorted(set(as_is["unsupported_ops"])
                                          | set(entry.get("with_fixed_shapes", {}).get("unsupported_ops", [])))
        providers[name] = entry
    return {"dynamic_inputs": [i.name for i in dynamic_inputs], "execution_providers": providers}


def _partition_summary(info) -> dict:
    return {
        "suitability": info.suitability().name,  # YES / MAYBE / NO, onnxruntime's own judgement
        "supported_nodes": int(info.num_supported_nodes),
        "nodes": int(info.num_nodes),
        "partitions": int(info.num_partitions),
        "unsupported_ops": sorted(info.unsupported_ops),
    }


def convert_to_ort(path: pathlib.Path, out_dir: pathlib.Path, feed) -> tuple[dict, bytes | None]:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    try:
        convert_onnx_models_to_ort(path, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
        ort_path = out_dir / path.with_suffix(".ort").name
        data = ort_path.read_bytes()
    except Exception as exc:  # the converter raises whatever onnxruntime raised
        message = first_line(exc)
        return {"converted": False, "error": message}, None
    section = {"converted": True, "size_bytes": len(data), "optimization_style": "Fixed"}
    if feed is not None:
        section.update(_run_ort(data, path, feed))
    return section, data


def _run_ort(data: bytes, onnx_path: pathlib.Path, feed) -> dict:
    """Run the .ort model once and compare it with the .onnx model on the same feed."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort_outputs = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feed)
    except Exception as exc:
        return {"runs": False, "error": first_line(exc)}
    onnx_outputs = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).run(None, feed)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
               for a, b in zip(ort_outputs, onnx_outputs))
    return {"runs": True, "max_abs_diff_vs_onnx": diff}


def verdict(report: dict) -> str:
    """One line for humans: does the .ort file work, and how would each mobile accelerator fare."""
    ort_part = ("converted to .ort and runs on the CPU EP" if report["ort"].get("runs", report["ort"]["converted"])
                else "ORT conversion FAILED" if not report["ort"]["converted"] else ".ort file does not run")
    parts = [ort_part]
    for name, ep in report["execution_providers"].items():
        text = f"{name} {ep['suitability']}"
        fixed = ep.get("with_fixed_shapes")
        if fixed and fixed["suitability"] != ep["suitability"]:
            text += f" ({fixed['suitability']} with fixed input shapes)"
        parts.append(text)
    if report["blocking_ops"]:
        parts.append("ops blocking an accelerator: " + ", ".join(op.split(":")[-1] for op in report["blocking_ops"]))
    return "; ".join(parts)
