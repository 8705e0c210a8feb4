"""Validation of a result against the original: the checker, outputs on the same inputs, cost before
and after, accuracy when the data has labels, and latency and the mobile check when asked for."""

from __future__ import annotations

import onnx

from ..io import model_size_bytes
from ..runtime import session
from ..shapes import infer_shapes
from .checker import check_model
from .compare import fidelity, run_model
from .cost import model_cost
from .labels import labelled_evaluation
from .latency import LatencyConfig, compare_latency


def validate(loaded, pruned: onnx.ModelProto, calibration, batch_size: int, reference: dict,
             output_axes: dict[str, int] | None = None, sess=None) -> dict:
    """Checker, onnxruntime outputs against the original's (`reference`) on the same inputs, cost
    before/after, and accuracy when the data has labels. `loaded`: the original (`loading.Loaded`);
    `output_axes`: the channel axis of outputs where it is not axis 1; `sess`: a session of `pruned`."""
    checker = check_model(pruned, loaded.runnable)
    result = run_model(sess or session(pruned), calibration, batch_size, "result outputs")
    after_shapes = infer_shapes(pruned, loaded.input_shapes)
    report = {
        "before": {**loaded.given_cost, "size_bytes": loaded.size_bytes},
        "after": {**model_cost(pruned, loaded.input_shapes, after_shapes), "size_bytes": model_size_bytes(pruned)},
        "fidelity": fidelity(reference, result, output_axes),
        "data": {"source": calibration.source, "samples": calibration.count},
        "checker": checker,
    }
    if calibration.labels is not None:
        report["accuracy"] = labelled_evaluation(reference, result, calibration.labels)
    return report


def evaluate_result(baseline, pruned: onnx.ModelProto, gates, latency: LatencyConfig | None,
                    mobile: bool) -> tuple[dict, bytes | None]:
    """`validate` on the baseline's evaluation data (`baseline.Baseline`), and with a held-out evaluation
    on the samples the fits used too, plus latency (asked for, or implied by a speedup gate) and the mobile
    check when asked for; (report, the .ort model or None)."""
    sess = session(pruned)
    report = validate(baseline.loaded, pruned, baseline.evaluation, baseline.run_batch, baseline.reference(),
                      baseline.output_axes, sess)
    report["data"].update(held_out=baseline.held_out, in_sample=baseline.evaluation_fitted)
    if baseline.held_out:  # the figure on the samples the fits used, beside the held-out one
        result = run_model(sess, baseline.in_sample, baseline.run_batch, "result outputs, in-sample")
        report["fidelity"]["in_sample"] = {**fidelity(baseline.reference_in_sample(), result, baseline.output_axes),
                                           "samples": baseline.in_sample.count}
    latency = latency or (LatencyConfig() if gates and gates.needs_latency else None)
    if latency is not None:
        report["latency"] = compare_latency(baseline.session(latency.threads), pruned, baseline.single_batch(), latency)
    ort_model = None
    if mobile:
        from .mobile import check_mobile  # imports onnxruntime's tools only when asked

        report["mobile"], ort_model = check_mobile(pruned, baseline.single_batch())
    return report, ort_model
