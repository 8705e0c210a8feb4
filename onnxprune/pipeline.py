"""The stage runner of `prune`: load -> analyze -> choose channels -> rewrite -> factorize -> recover ->
validate, each stage timed, and the report they make together. The stages are in `stages`.

`prune` takes a path, an `onnx.ModelProto` (never modified) or a `baseline.Baseline`.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import onnx

from .baseline import Baseline, prepare
from .config import PruneConfig, check_config, config_section, latency_wanted, lowrank_settings, sparsity_settings
from .errors import NothingToPrune
from .plan import Plan
from .quantize import excluded_nodes
from .recover.training import require_training
from .report import report_header
from .speed import counts_of, latency_budget, latency_rounds
from .stages import (analyze_model, choose, compose_masks, factorize_stage, group_summary, nothing_prunable_message,
                     final_counts, recover_stage, rewrite_channels, scoring_summary, sparsify_stage,
                     reselected, step_counts, step_summary, store_stage, pruned_only_summary, quantize_stage)
from .validate.gates import evaluate_gates
from .validate.latency import LatencyConfig
from .validate.result import evaluate_result


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: dict
    ort_model: bytes | None = None  # the result in onnxruntime's ORT format, with PruneConfig.mobile


@contextmanager
def timed(timings: dict, stage: str, add: bool = False):
    """Record the block's wall time in seconds as `timings[stage]` (when it completes); `add`: added to
    the time already recorded (a stage run once per step)."""
    started = time.perf_counter()
    yield
    timings[stage] = (timings.get(stage, 0.0) if add else 0.0) + time.perf_counter() - started


def prune(model, config: PruneConfig | None = None) -> PruneResult:
    """Prune channels of `model` (a path, a ModelProto, or a `Baseline` from `prepare` to reuse its
    loaded model, data and reference outputs) as `config` says; validate; report."""
    config = config or PruneConfig()
    check_config(config)
    if latency_wanted(config) and config.latency is None:  # the result is measured against the prediction
        config = replace(config, latency=LatencyConfig())
    if config.finetune_steps:
        require_training()  # fail before any work when onnxruntime-training is missing
    timings = {}
    with timed(timings, "load"):
        baseline = model if isinstance(model, Baseline) else prepare(model, config)
        if lowrank_settings(config) is None:  # no node will be added: a glob matching none is refused now
            excluded_nodes(baseline.loaded.model, config.quantize_exclude)
        baseline.reference()  # now, while the original is the only model in memory
    loaded = baseline.loaded

    lowrank = lowrank_settings(config)
    sparsity = sparsity_settings(config, baseline.calibration)
    schedule = config  # with --sparsity, --steps and --finetune-steps are the weights' schedule; channels take one step
    if config.target_macs is not None and loaded.simplified:  # a share of the MACs as given: the rewrites bought some
        config = replace(config, target_macs=min(1.0, config.target_macs * loaded.given_cost["macs"] / loaded.cost["macs"]))
    if sparsity is not None:
        config = replace(config, steps=1, finetune_steps=0)
    weights_only = lowrank is not None or sparsity is not None  # channels may stay whole
    step_reports, current, total_masks, plan, whole, final = [], baseline, {}, None, None, None
    speed, rewritten = None, None  # rewritten: the latency rounds' chosen cut (model, masks), not cut again
    for step in range(config.steps):
        with timed(timings, "analyze", add=True):
            analysis = analyze_model(current.loaded, config.exclude, config.hidden)
            if not analysis.prunable_groups() and not weights_only:
                raise NothingToPrune(nothing_prunable_message(analysis))
        if step == 0 and latency_wanted(config):
            with timed(timings, "latency_model"):
                speed = latency_budget(baseline, analysis, config)
            if config.round_to == "auto":  # per group (the report's config says auto, latency.round_to which)
                config = replace(config, round_to=speed.round_to_auto())
            elif config.round_to is None and speed.target_ms is not None:  # this machine's channel block
                config = replace(config, round_to=speed.round_to_block(analysis))

        with timed(timings, "score", add=True):
            if speed is not None and speed.target_ms is not None:
                choice, rewritten = latency_rounds(current, analysis, config, speed, factorizing=weights_only)
                if config.reselect:  # on the kept round's counts, then cut anew
                    choice, rewritten = reselected(current, analysis, choice, config), None
            elif config.steps == 1:
                choice = choose(current, analysis, config, factorizing=weights_only)
            else:  # the whole target is allocated once, on the original; the steps approach it
                if whole is None:
                    whole = choose(current, analysis, config, factorizing=weights_only)
                    final = final_counts(analysis, whole)
                counts = step_counts(analysis, final, step + 1, config.steps, config.round_to)
                choice = replace(choose(current, analysis, config, lowrank is not None, counts), budget=whole.budget)
            step_plan = Plan.from_keep(analysis, choice.keep, choice.scales)
            plan = step_plan if plan is None else plan.then(step_plan)

        with timed(timings, "rewrite", add=True):
            if step == 0:
                group_reports = [group_summary(g, len(choice.keep[g.index]) if g.index in choice.keep else None)
                                 for g in analysis.groups]
                coverage = analysis.coverage()
            if speed is not None:
                kept_counts = counts_of(choice.keep)
            pruned, masks = rewritten or rewrite_channels(analysis, choice, loaded.model.ir_version)
            total_masks = compose_masks(total_masks, masks)
            del analysis
            gc.collect()  # graphsurgeon graphs are reference cycles: free the weights now, not at some later gc

        lowrank_report = None
        if lowrank is not None:  # channels are pruned first, then layers are factorized
            with timed(timings, "lowrank"):
                pruned, plan.lowrank, lowrank_report = factorize_stage(pruned, baseline, lowrank, config)

        with timed(timings, "recover", add=True):  # every step is re-fitted to the original's outputs
            pruned, recovery_report = recover_stage(pruned, baseline, total_masks, config)
        if config.steps > 1:
            current = baseline.pruned_to(pruned)
            step_reports.append(step_summary(current.loaded.cost["macs"] / loaded.given_cost["macs"], choice, recovery_report))
    sparsity_report = None
    if sparsity is not None:  # weights are zeroed last: recovery's dense re-fit would fill them in again
        with timed(timings, "sparsity"):
            pruned, sparsity_report = sparsify_stage(pruned, baseline, sparsity, schedule)
    if config.steps > 1:  # the groups' channels after the last step
        kept = {tuple(gp.sources): len(gp.keep) for gp in plan.groups}
        for summary in group_reports:
            if tuple(summary["sources"]) in kept:
                summary["channels_after"] = kept[tuple(summary["sources"])]

    if baseline is not model and loaded.path is not None:
        loaded.model = None  # not needed any more (and re-readable from its file): free it for validation
        gc.collect()
    quantize_report = None
    if config.quantize:  # the pruned model validated alone, then handed to onnxruntime's quantization
        with timed(timings, "validate"):
            pruned_only = pruned_only_summary(evaluate_result(baseline, pruned, None, config.latency, False)[0])
        with timed(timings, "quantize"):
            pruned, quantize_report = quantize_stage(pruned, baseline, config.quantize_exclude)
        quantize_report["pruned_only"] = pruned_only
    with timed(timings, "validate", add=True):
        report, ort_model = evaluate_result(baseline, pruned, config.gates, config.latency, config.mobile)
    report.update({
        **report_header(),
        "groups": group_reports,
        "coverage": coverage,
        "simplified": loaded.simplified,
        "config": config_section(schedule, choice.scorer, loaded.input_shapes),
        "scoring_notes": choice.context.notes,
        "scoring": scoring_summary(choice, config),
        "seed": config.seed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **recovery_report,
    })
    if speed is not None:
        report["latency"].update(speed.section(kept_counts, report["latency"]))
    if lowrank_report is not None:
        report["lowrank"] = lowrank_report
    if quantize_report is not None:
        report["quantize"] = quantize_report
    if sparsity_report is not None:
        report["sparsity"] = sparsity_report
        pruned = store_stage(pruned, report, config.sparse_index)  # after validation, on the dense model
    if step_reports:
        report["steps"] = step_reports
    report["gates"] = evaluate_gates(report, config.gates)
    if speed is not None and report["gates"]["passed"]:  # a failed gate writes nothing, the cache neither
        speed.save()
    return PruneResult(pruned, plan, report, ort_model)
