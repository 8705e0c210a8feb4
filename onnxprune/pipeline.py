"""The public pipeline: load -> analyze -> score -> allocate -> plan -> rewrite -> validate.

`prune` and `inspect` take a path or an `onnx.ModelProto` and never modify it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import __version__
from .allocate import keep_counts, select
from .calib import CalibrationSet, input_specs, load_calibration, synthetic
from .errors import NothingToPrune
from .graph import Analysis, analyze
from .io import file_size, load_model, model_size_bytes, normalize_model, resolve_input_shapes
from .shapes import infer_shapes
from .plan import Plan
from .rewrite import apply_channel_plan
from .scoring import ScoringContext, score
from .validate import check_model, fidelity, model_cost, run_model, session

log = logging.getLogger(__name__)
ort.set_default_logger_severity(3)  # onnxruntime's optimizer warnings are noise to our users

SYNTHETIC_SAMPLES = 8
RUN_BATCH = 32
FOLD_LIMIT_BYTES = 256 << 20


@dataclass
class PruneConfig:
    filters: float = 0.5  # fraction of channels removed (per group, or overall with global_ranking)
    global_ranking: bool = False
    scorer: str = "l1"
    round_to: int | None = None  # None: 8 for groups of 16+ channels, else 1
    exclude: tuple[str, ...] = ()
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calibration: CalibrationSet | str | os.PathLike | None = None
    seed: int = 0
    plan: Plan | None = None  # apply this plan instead of scoring and allocating


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: dict


@dataclass
class Loaded:
    """A normalised model with its static input shapes and inferred tensor shapes."""

    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]
    shapes: dict[str, tuple]
    size_bytes: int


def load(model: onnx.ModelProto | str | os.PathLike, input_shapes=None) -> Loaded:
    if isinstance(model, onnx.ModelProto):
        proto, size = normalize_model(model), model_size_bytes(model)
    else:
        proto, size = load_model(model), file_size(model)
    resolved = resolve_input_shapes(proto, input_shapes)
    return Loaded(proto, resolved, infer_shapes(proto, resolved), size)


def analyze_model(loaded: Loaded, exclude=()) -> Analysis:
    graph = gs.import_onnx(loaded.model)
    fold_constants(graph)
    graph.toposort()
    return analyze(graph, loaded.shapes, exclude)


def fold_constants(graph: gs.Graph) -> None:
    """Evaluate subgraphs that depend only on constants (weights reshaped, transposed or cast by the
    exporter) so that handlers see constant weights. Shapes are not folded: dynamic dims stay dynamic."""
    try:
        graph.fold_constants(fold_shapes=False, error_ok=False, size_threshold=FOLD_LIMIT_BYTES).cleanup()
    except Exception as exc:  # folding is an optimisation of the analysis, never a requirement
        log.info("constant folding skipped: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def inspect(model, input_shapes=None, exclude=()) -> dict:
    """Groups, coverage and cost of a model, as plain data (what `onnxprune inspect` prints)."""
    loaded = load(model, input_shapes)
    analysis = analyze_model(loaded, exclude)
    return {
        "groups": [group_summary(g) for g in analysis.groups],
        "coverage": analysis.coverage(),
        **model_cost(loaded.model, loaded.input_shapes, loaded.shapes),
        "size_bytes": loaded.size_bytes,
        "input_shapes": loaded.input_shapes,
    }


def group_summary(group, kept: int | None = None) -> dict:
    summary = {
        "name": group.name,
        "sources": [s.node.name for s in group.sources],
        "members": group.members,
        "channels": group.channels,
        "prunable": group.prunable,
    }
    if kept is not None:
        summary["channels_after"] = kept
    if not group.prunable:
        summary["reasons"] = group.blocked
    return summary


def prune(model, config: PruneConfig | None = None) -> PruneResult:
    """Prune channels of `model` (a path or ModelProto) as `config` says; validate; report."""
    config = config or PruneConfig()
    timings = {}
    started = time.perf_counter()
    loaded = load(model, config.input_shapes)
    specs = input_specs(loaded.model, loaded.input_shapes)
    calibration = _calibration(config, specs)
    timings["load"] = time.perf_counter() - started

    t = time.perf_counter()
    analysis = analyze_model(loaded, config.exclude)
    if not analysis.prunable_groups():
        raise NothingToPrune(nothing_prunable_message(analysis))
    timings["analyze"] = time.perf_counter() - t

    t = time.perf_counter()
    context = ScoringContext(seed=config.seed, calibration=calibration)
    if config.plan is not None:
        keep = config.plan.to_keep(analysis)
    else:
        scores = score(analysis, config.scorer, context)
        counts = keep_counts(analysis, scores, config.filters, config.global_ranking, config.round_to)
        keep = select(analysis, scores, counts)
    plan = Plan.from_keep(analysis, keep)
    timings["score"] = time.perf_counter() - t

    t = time.perf_counter()
    group_reports = [group_summary(g, len(keep[g.index]) if g.index in keep else None) for g in analysis.groups]
    coverage = analysis.coverage()
    apply_channel_plan(analysis, keep)
    pruned = gs.export_onnx(analysis.graph)
    pruned.ir_version = loaded.model.ir_version
    del analysis
    timings["rewrite"] = time.perf_counter() - t

    t = time.perf_counter()
    report = validate(loaded, pruned, calibration, specs)
    timings["validate"] = time.perf_counter() - t
    report.update({
        "groups": group_reports,
        "coverage": coverage,
        "config": {"filters": config.filters, "global": config.global_ranking, "scorer": config.scorer,
                   "round_to": config.round_to, "exclude": list(config.exclude),
                   "input_shapes": loaded.input_shapes, "plan_given": config.plan is not None},
        "scoring_notes": context.notes,
        "seed": config.seed,
        "version": __version__,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    })
    return PruneResult(pruned, plan, report)


def _calibration(config: PruneConfig, specs) -> CalibrationSet:
    data = config.calibration
    if data is None:
        return synthetic(specs, SYNTHETIC_SAMPLES, config.seed)
    if isinstance(data, CalibrationSet):
        return data
    return load_calibration(data, specs)


def run_batch_size(specs) -> int:
    fixed = [s.fixed_batch for s in specs if s.fixed_batch]
    return min(fixed) if fixed else RUN_BATCH


def validate(loaded: Loaded, pruned: onnx.ModelProto, calibration: CalibrationSet, specs) -> dict:
    """Checker, onnxruntime outputs against the original on the same inputs, and cost before/after."""
    check_model(pruned)
    batch = run_batch_size(specs)
    reference = run_model(session(loaded.model), calibration, batch)
    result = run_model(session(pruned), calibration, batch)
    after_shapes = infer_shapes(pruned, loaded.input_shapes)
    return {
        "before": {**model_cost(loaded.model, loaded.input_shapes, loaded.shapes), "size_bytes": loaded.size_bytes},
        "after": {**model_cost(pruned, loaded.input_shapes, after_shapes), "size_bytes": model_size_bytes(pruned)},
        "fidelity": fidelity(reference, result),
        "data": {"source": calibration.source, "samples": calibration.count},
    }


def nothing_prunable_message(analysis: Analysis) -> str:
    if not analysis.groups:
        return ("nothing to prune: the model has no Conv, ConvTranspose, Gemm or MatMul layer with constant "
                "weights; run 'onnxprune inspect' to see its analysis")
    reasons: dict[str, int] = {}
    for group in analysis.groups:
        for reason in group.blocked[:1]:
            key = reason.split(":")[-1].strip() if "'" in reason else reason
            reasons[key] = reasons.get(key, 0) + 1
    top = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    return (f"nothing to prune: all {len(analysis.groups)} channel groups are blocked ({top}); "
            "run 'onnxprune inspect' for every reason")
