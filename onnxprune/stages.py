"""The stages of `prune` between loading and validation, each a function of the baseline, the config
and what earlier stages made: analyze, choose channels, rewrite, factorize, recover."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .baseline import Baseline
from .allocate import group_round_to, round_keep, round_step
from .budget import Target, choose_channels, short_of
from .config import PruneConfig, channel_ratio, recovery_method, scorer_name
from .errors import NothingToPrune, UsageError
from .graph import Analysis, analyze
from .loading import Loaded, copied_messages
from .lowrank import LowRankSettings, factorize_model
from .ops.base import HIDDEN
from .plan import source_names
from .quantize import quantize_int8
from .recover import recover
from .io import EXTERNAL_DATA_THRESHOLD, export_graph, fold_constants, import_graph, model_size_bytes, unload_maps
from .sparsity import SparsitySettings, recount, sparsify_model
from .sparsity.storage import store_sparse
from .validate import check_model
from .recover.training import finetune
from .recover.training_graph import fold_batchnorm
from .rewrite import apply_channel_plan, apply_unit_scales, keep_masks
from .scoring import ScoringContext
from .rewrite.streams import gathered_model, masked_model
from .scoring.reselect import reselect, reselect_sequential

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- analyze


def analyze_model(loaded: Loaded, exclude=(), hidden: bool = False) -> Analysis:
    """The channel groups of the loaded model; `hidden`: the residual width may be pruned (`--hidden`)."""
    graph = import_graph(loaded.model)
    check_exclude(exclude, graph)
    graph.import_domains = copied_messages(graph.import_domains)  # export may add to them: never to the model's
    fold_constants(graph)
    graph.toposort()
    return analyze(graph, loaded.shapes, exclude, {HIDDEN} if hidden else ())


def check_exclude(patterns, graph) -> None:
    """Every --exclude glob matches the name of a node of the model as loaded (loading names a nameless
    node after its first output): a mistyped one would leave what it meant to protect prunable."""
    names = [node.name for node in graph.nodes]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UsageError(f"--exclude {pattern!r} matches no node of the model as loaded: it is a case-sensitive "
                             "glob over node names, after loading's exact rewrites (--no-simplify keeps the graph as "
                             "given); 'onnxprune inspect MODEL --json' lists each group's members")


def group_summary(group, kept: int | None = None) -> dict:
    summary = {
        "name": group.name,
        "sources": list(source_names(group)),
        "members": group.members,
        "channels": group.channels,
        "prunable": group.prunable,
    }
    if kept is not None:
        summary["channels_after"] = kept
    if not group.prunable:
        summary["reasons"] = group.blocked
    elif group.inexact:
        summary["inexact"] = group.inexact
    return summary


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


# ---------------------------------------------------------------- choose channels


@dataclass
class ChannelChoice:
    keep: dict[int, np.ndarray]  # kept unit positions per group
    scales: dict[int, np.ndarray]  # per-unit weight scales (PFP's sample mode)
    scorer: str  # the scorer that ran ("none" when only factorizing)
    context: ScoringContext  # the scoring notes and statistics
    budget: dict | None  # how a global budget was met


def choose(baseline: Baseline, analysis: Analysis, config: PruneConfig, factorizing: bool,
           counts: dict[int, int] | None = None, target: Target | None = None) -> ChannelChoice:
    """Kept channels: from the config's plan, all of them when only factorizing, else scored and allocated
    (or, given `counts` per group, scored only to pick which; given a `target`, allocated to meet it)."""
    scorer = scorer_name(config, baseline.calibration)
    context = ScoringContext(seed=config.seed, calibration=baseline.calibration, model=baseline.loaded.model,
                             batch_size=config.calib_batch, pfp_points=config.pfp_points,
                             fixed_batch=baseline.fixed_batch, hold_out=baseline.held_out,
                             allocating=counts is None)
    if config.plan is not None:
        return ChannelChoice(config.plan.to_keep(analysis), config.plan.to_scales(analysis), scorer, context, None)
    if factorizing and channel_ratio(config) == 0:  # factorization alone: no scoring pass
        keep = {g.index: np.arange(g.channels) for g in analysis.prunable_groups()}
        return ChannelChoice(keep, {}, "none", context, None)
    scores = baseline.scores(analysis, scorer, context, config)
    keep, scales, budget = choose_channels(
        analysis, scores, context, filters=channel_ratio(config), global_ranking=config.global_ranking,
        round_to=config.round_to, target_macs=config.target_macs if config.rank is None else None,
        pfp_mode=config.pfp_mode, seed=config.seed, counts=counts, target=target)
    if budget is not None and budget.get("unit") != "ms":  # a latency budget's rounds say whether they met it
        budget["reached"] = not short_of(budget)
        if not budget["reached"]:
            unit = "MACs" if budget["unit"] == "macs" else "channels"
            context.notes.append(f"budget not reached: {budget['achieved']:,.0f} {unit} kept for a target of "
                                 f"{budget['target']:,.0f}, every group at the least it may keep (or excluded): "
                                 "this is as small as this model gets here")
    uncut = [g for g in analysis.prunable_groups()
             if isinstance(config.round_to, int) and round_step(g.channels, config.round_to, g.width) >= g.channels > 1]
    if uncut:
        context.notes.append(f"--round-to {config.round_to}: {len(uncut)} group(s) cannot be cut at that multiple "
                             f"(e.g. '{uncut[0].name}', {uncut[0].channels} units of {uncut[0].width} channel(s)): "
                             "left whole; a smaller --round-to lets them be cut")
    choice = ChannelChoice(keep, scales, scorer, context, budget)
    if counts is not None or target is not None:  # a step's given counts; latency rounds: once, after them
        return choice
    return reselected(baseline, analysis, choice, config)


def reselected(baseline: Baseline, analysis: Analysis, choice: ChannelChoice, config: PruneConfig) -> ChannelChoice:
    """The choice with obs's channels chosen again (`config.reselect`; not for a plan's channels)."""
    if not (config.reselect and choice.scorer == "obs" and config.plan is None):
        return choice
    return replace(choice, keep=reselect_stage(baseline, analysis, choice.keep, config))


def reselect_stage(baseline: Baseline, analysis: Analysis, keep: dict, config: PruneConfig) -> dict:
    """obs's counts, its channels chosen again (scoring/reselect.py): on the round-one pruned stream, or
    group after group on the stream of the groups chosen before (`reselect="sequential"`)."""
    fresh = analyze_model(baseline.loaded, config.exclude, config.hidden)
    ir_version = baseline.loaded.model.ir_version
    original, calibration = baseline.loaded.model, baseline.calibration
    if config.reselect == "sequential":
        return reselect_sequential(analysis, keep, original, gathered_model(fresh, keep, ir_version), calibration,
                                   config.seed, config.calib_batch, baseline.fixed_batch, baseline.run_batch,
                                   baseline.held_out, baseline.loaded.shapes)
    if config.reselect != "masked":  # "masked": the round-one stream not re-fitted (measured in README)
        pruned, _ = recover(original, gathered_model(fresh, keep, ir_version), calibration, "lstsq", {},
                            baseline.loaded.shapes, baseline.run_batch, config.seed, progress=False,
                            hold_out=baseline.held_out, reference=baseline.held_out_reference())
    else:
        pruned = masked_model(fresh, keep, ir_version)
    return reselect(analysis, keep, original, pruned, calibration, config.seed, config.calib_batch,
                    baseline.fixed_batch)


def final_counts(analysis: Analysis, choice: ChannelChoice) -> dict[tuple, tuple[int, int]]:
    """Per group (by its source layers): (channels, channels kept) of a choice made for the whole target."""
    return {source_names(g): (g.channels, len(choice.keep[g.index])) for g in analysis.prunable_groups()
            if g.index in choice.keep}


def step_counts(analysis: Analysis, final: dict[tuple, tuple[int, int]], step: int, steps: int, round_to) -> dict[int, int]:
    """Keep counts for step `step` (1 .. steps) of --steps: every group goes geometrically from its original
    channels C to its final count F (`final_counts`), C (F/C)^(step/steps), rounded as one step would
    round; the last step keeps exactly F, so N steps end at the MACs one step reaches."""
    counts = {}
    for group in analysis.prunable_groups():
        channels, kept = final.get(source_names(group), (group.channels, group.channels))
        share = round(channels * (kept / channels) ** (step / steps)) if step < steps else kept
        rounded = round_keep(share, channels, group_round_to(round_to, group.index), group.width)
        counts[group.index] = int(np.clip(rounded, kept, group.channels))
    return counts


def scoring_summary(choice: ChannelChoice, config: PruneConfig) -> dict:
    """Which scorer ran, on what data, and how the budget was met (for the report)."""
    context = choice.context
    summary = {"scorer": "plan" if config.plan is not None else choice.scorer, "data": context.calibration.source,
               "samples": context.fit_data().count}
    if context.allocation is not None and config.plan is None:
        summary.update(context.allocation.summary(config.pfp_mode))
    if choice.budget is not None:
        summary["budget"] = choice.budget
    return summary


# ---------------------------------------------------------------- rewrite, factorize, recover, sparsify


def rewrite_channels(analysis: Analysis, choice: ChannelChoice, ir_version: int) -> tuple[onnx.ModelProto, dict]:
    """Scale and slice `analysis.graph` in place; (the pruned model, kept-channel masks per tensor)."""
    masks = keep_masks(analysis, choice.keep)
    unload_maps(analysis.graph)  # scoring read them all; slicing reads one at a time
    apply_unit_scales(analysis, choice.scales)
    apply_channel_plan(analysis, masks)
    pruned = export_graph(analysis.graph)
    pruned.ir_version = ir_version
    return pruned, masks


def compose_masks(before: dict[str, np.ndarray], step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Kept-channel masks over the original's channels after one more step whose masks (`step`) are over
    the channels `before` kept."""
    total = dict(before)
    for name, mask in step.items():
        if name in total:  # a mask over several axes (channels split by a Reshape) composes in row-major order
            combined = np.zeros(total[name].size, dtype=bool)
            combined[np.flatnonzero(total[name])[mask.ravel()]] = True
            total[name] = combined.reshape(total[name].shape)
        else:
            total[name] = mask.copy()
    return total


def step_summary(macs_kept: float, choice: ChannelChoice, recovery: dict) -> dict:
    """One step of --steps for the report: the MACs kept of the original, channels kept, the held-out error
    (and the distillation loss before and after when the step was fine-tuned)."""
    summary = {"macs_kept": macs_kept, "channels_kept": int(sum(len(k) for k in choice.keep.values())),
               "scorer": choice.scorer, "output_error_held_out": recovery["recovery"].get("output_error_held_out")}
    if "finetune" in recovery:
        summary["finetune_loss"] = {"before": recovery["finetune"]["loss_before"],
                                    "after": recovery["finetune"]["loss_after"]}
    return summary


def factorize_stage(pruned: onnx.ModelProto, baseline: Baseline, settings: LowRankSettings, config: PruneConfig):
    """Factorize the channel-pruned model; (model, ranks for the plan, report section)."""
    loaded = baseline.loaded
    result = factorize_model(pruned, loaded.input_shapes, baseline.fit_data, settings, loaded.given_cost["macs"],
                             baseline.largest_batch)
    if not result.plan and config.plan is None and channel_ratio(config) == 0:
        raise NothingToPrune(nothing_factorized_message(result.report))
    return result.model, result.plan, result.report


def nothing_factorized_message(report: dict) -> str:
    reasons: dict[str, int] = {}
    for layer in report["layers"]:
        key = layer["reason"].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    top = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    if not reasons:
        return "nothing to factorize: the model has no Conv, Gemm or MatMul layer"
    return (f"nothing to factorize: none of {len(report['layers'])} layers qualifies ({top}); "
            "try a lower --rank or a higher --lowrank-error")


def sparsify_stage(model: onnx.ModelProto, baseline: Baseline, settings: SparsitySettings, config: PruneConfig):
    """Zero weights of the pruned (and recovered) model; (model, report section). With --steps N the
    sparsity rises in N steps (the share of weights kept falls geometrically, the last step at the target;
    zeros cost nothing, so each step keeps the earlier zeros), and with --finetune-steps K every step is
    fine-tuned towards the original with its zeros held (`recover.masks`; spliced with --splicing)."""
    shapes, data, batch = baseline.loaded.input_shapes, baseline.fit_data, baseline.largest_batch
    if config.steps == 1 and not config.finetune_steps:
        result = sparsify_model(model, shapes, data, settings, batch)
        return result.model, result.report
    if config.finetune_steps:  # training folds BatchNorm into the convs: fold it first, so it trains these weights
        model, _ = fold_batchnorm(model)
    schedule = []
    for step in range(1, config.steps + 1):
        target = 1.0 - (1.0 - settings.sparsity) ** (step / config.steps)
        result = sparsify_model(model, shapes, data, replace(settings, sparsity=target), batch,
                                keep_dense=config.splicing)
        model, entry = result.model, {"target": target, "achieved": result.report["achieved"],
                                      "worst_error": result.report["worst_error"]}
        if config.finetune_steps:
            model, tuned = finetune(model, baseline.loaded.model, data, config.finetune_steps, lr=config.finetune_lr,
                                    batch_size=batch, seed=config.seed + step, masked=result.sparsified,
                                    dense=result.dense if config.splicing else None)
            recount(result.report, model)
            entry.update(finetune_loss={"before": tuned["loss_before"], "after": tuned["loss_after"]},
                         after_finetune=result.report["achieved"])
        schedule.append(entry)
    result.report["schedule"] = {"steps": config.steps, "finetune_steps": config.finetune_steps,
                                 "splicing": config.splicing, "each": schedule}
    return model, result.report


def kept_if_lower_loss(before: onnx.ModelProto, tuned: onnx.ModelProto, section: dict) -> onnx.ModelProto:
    """The fine-tuned model when fine-tuning lowered the loss, else the model before it (a few Adam steps
    can raise it above the least-squares fit's), said in the report's section."""
    if section["loss_after"] <= section["loss_before"]:
        return tuned
    section["kept"] = "the model before fine-tuning: its steps raised the loss (give more steps or a lower --finetune-lr)"
    return before


def store_stage(model: onnx.ModelProto, report: dict, index: str) -> onnx.ModelProto:
    """The validated sparse model with its zeros stored sparse where that is smaller, with `index` indices;
    the report's `sparsity.storage` and `after.size_bytes` say what the file takes. A model written with
    external data stays dense. Validation checked the dense model: with int64 indices the stored one must
    pass the ONNX checker too; the smallest indices it refuses (onnxruntime loads them), so the report's
    `checker` says it checked the dense form."""
    if model_size_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        report["sparsity"]["storage"] = {"note": "stored dense: too large for one protobuf file"}
        return model
    stored, report["sparsity"]["storage"] = store_sparse(model, index)
    report["after"]["size_bytes"] = report["sparsity"]["storage"]["stored_bytes"]
    narrow = set(report["sparsity"]["storage"]["index_types"]) - {"int64"}
    if report["checker"]["passed"] and not narrow:
        check_model(stored)
    elif report["checker"]["passed"]:
        report["checker"]["note"] = ("checked dense: the file's sparse indices narrower than int64 are refused by "
                                     "onnx.checker (--sparse-index smallest; onnxruntime loads them)")
    return stored


def quantize_stage(model: onnx.ModelProto, baseline: Baseline, exclude: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """The pruned model quantized to int8 by onnxruntime (nodes matching `exclude` left float), with
    activation ranges from the samples the fits used; (model, the report's `quantize` settings)."""
    return quantize_int8(model, baseline.fit_data, baseline.run_batch, exclude)


def pruned_only_summary(report: dict) -> dict:
    """What the pruned model scored before quantization, for the report's `quantize.pruned_only`."""
    summary = {"size_bytes": report["after"]["size_bytes"],
               "fidelity": {k: report["fidelity"][k] for k in ("cosine", "rel_l2", "max_abs_diff", "top1_agreement")}}
    if report.get("accuracy"):
        summary["accuracy"] = report["accuracy"]["after"]
    if "latency" in report:
        summary["latency_ms"] = report["latency"]["after"]["median_ms"]
    return summary


def recover_stage(pruned: onnx.ModelProto, baseline: Baseline, masks: dict, config: PruneConfig):
    """Re-fit the changed layers on the calibration data, then fine-tune when asked; (model, report keys)."""
    loaded, calibration = baseline.loaded, baseline.calibration
    method = recovery_method(config, calibration)
    pruned, recovery = recover(loaded.model, pruned, calibration, method, masks, loaded.shapes, baseline.run_batch,
                               config.seed, hold_out=baseline.held_out, reference=baseline.held_out_reference())
    if calibration.source == "synthetic" and method != "none":
        recovery["note"] = "fitted on synthetic inputs: give --calib with real samples for a meaningful fit"
    sections = {"recovery": recovery}
    if config.finetune_steps:
        tuned, sections["finetune"] = finetune(pruned, loaded.model, baseline.fit_data, config.finetune_steps,
                                               lr=config.finetune_lr, batch_size=baseline.largest_batch,
                                               seed=config.seed)
        pruned = kept_if_lower_loss(pruned, tuned, sections["finetune"])
        if calibration.source == "synthetic":
            sections["finetune"]["note"] = "trained on synthetic inputs: give --calib with real samples"
    return pruned, sections
