"""The stage runner of `prune`: load -> analyze -> choose channels -> rewrite -> factorize -> recover ->
validate, each stage timed, and the report they make together. The stages are in `stages`.

`prune` takes a path, an `onnx.ModelProto` (never modified) or a `baseline.Baseline`.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass

import onnx

from .baseline import Baseline, prepare
from .config import PruneConfig, check_config, config_section, lowrank_settings
from .errors import NothingToPrune
from .plan import Plan
from .recover.training import require_training
from .report import report_header
from .stages import (analyze_model, choose, factorize_stage, group_summary, nothing_prunable_message, recover_stage,
                     rewrite_channels, scoring_summary)
from .validate.gates import evaluate_gates
from .validate.result import evaluate_result


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: dict
    ort_model: bytes | None = None  # the result in onnxruntime's ORT format, with PruneConfig.mobile


@contextmanager
def timed(timings: dict, stage: str):
    """Record the block's wall time in seconds as `timings[stage]` (when it completes)."""
    started = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - started


def prune(model, config: PruneConfig | None = None) -> PruneResult:
    """Prune channels of `model` (a path, a ModelProto, or a `Baseline` from `prepare` to reuse its
    loaded model, data and reference outputs) as `config` says; validate; report."""
    config = config or PruneConfig()
    check_config(config)
    if config.finetune_steps:
        require_training()  # fail before any work when onnxruntime-training is missing
    timings = {}
    with timed(timings, "load"):
        baseline = model if isinstance(model, Baseline) else prepare(model, config)
        baseline.reference()  # now, while the original is the only model in memory
    loaded = baseline.loaded

    with timed(timings, "analyze"):
        analysis = analyze_model(loaded, config.exclude)
        lowrank = lowrank_settings(config)
        if not analysis.prunable_groups() and lowrank is None:
            raise NothingToPrune(nothing_prunable_message(analysis))

    with timed(timings, "score"):
        choice = choose(baseline, analysis, config, factorizing=lowrank is not None)
        plan = Plan.from_keep(analysis, choice.keep, choice.scales)

    with timed(timings, "rewrite"):
        group_reports = [group_summary(g, len(choice.keep[g.index]) if g.index in choice.keep else None)
                         for g in analysis.groups]
        coverage = analysis.coverage()
        pruned, masks = rewrite_channels(analysis, choice, loaded.model.ir_version)
        del analysis
        gc.collect()  # graphsurgeon graphs are reference cycles: free the weights now, not at some later gc

    lowrank_report = None
    if lowrank is not None:  # channels are pruned first, then layers are factorized
        with timed(timings, "lowrank"):
            pruned, plan.lowrank, lowrank_report = factorize_stage(pruned, baseline, lowrank, config)

    with timed(timings, "recover"):
        pruned, recovery_report = recover_stage(pruned, baseline, masks, config)

    if baseline is not model and loaded.path is not None:
        loaded.model = None  # not needed any more (and re-readable from its file): free it for validation
        gc.collect()
    with timed(timings, "validate"):
        report, ort_model = evaluate_result(baseline, pruned, config.gates, config.latency, config.mobile)
    report.update({
        **report_header(),
        "groups": group_reports,
        "coverage": coverage,
        "config": config_section(config, choice.scorer, loaded.input_shapes),
        "scoring_notes": choice.context.notes,
        "scoring": scoring_summary(choice, config),
        "seed": config.seed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **recovery_report,
    })
    if lowrank_report is not None:
        report["lowrank"] = lowrank_report
    report["gates"] = evaluate_gates(report, config.gates)
    return PruneResult(pruned, plan, report, ort_model)
