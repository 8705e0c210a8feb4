"""The public pipeline: load -> analyze -> score -> allocate -> plan -> rewrite -> validate.

`prune` and `inspect` take a path or an `onnx.ModelProto` and never modify it.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import __version__
from .calib import CalibrationSet, input_specs, load_calibration, synthetic
from .errors import NothingToPrune, UsageError
from .graph import Analysis, analyze
from .io import ModelFile, load_model_file, model_size_bytes, normalize_model, resolve_input_shapes
from .shapes import infer_shapes
from .plan import Plan
from .rewrite import apply_channel_plan, apply_unit_scales
from .budget import choose_channels
from .rewrite.channels import keep_masks
from .recover import FINETUNE_LR, METHODS as RECOVERY_METHODS, recover
from .lowrank import DEFAULT_MAX_ERROR, LowRankSettings, check_rank, factorize_model
from .scoring import ScoringContext, score
from .validate import check_model, fidelity, model_cost, run_model, session
from .validate.runtime import release_free_memory
from .validate.gates import Gates, check_gate_requirements, evaluate_gates
from .validate.labels import labelled_evaluation, load_labels
from .validate.latency import LatencyConfig, compare_latency
from .report import SCHEMA_VERSION

log = logging.getLogger(__name__)
ort.set_default_logger_severity(3)  # onnxruntime's optimizer warnings are noise to our users

SYNTHETIC_SAMPLES = 8
RUN_BATCH = 32
RUN_BUDGET_BYTES = 96 << 20  # onnxruntime's buffers for one batch of a validation run: about 4x the model's
# largest tensor per sample (measured on ResNet-50: 430 MB at 32 samples of 3x224x224)
FOLD_LIMIT_BYTES = 256 << 20
RELOAD_ABOVE_BYTES = 32 << 20  # below this, parsing a model twice costs more than its memory is worth


@dataclass
class PruneConfig:
    filters: float | None = None  # fraction of channels removed (per group, or overall with global_ranking);
    # None: 0.5, or 0 when `rank` or `target_macs` is given (see `channel_ratio`)
    rank: float | str | None = None  # low-rank factorization after channel pruning: fraction of each layer's rank, or "auto"
    lowrank_error: float = DEFAULT_MAX_ERROR  # with rank "auto": each layer's largest relative error
    target_macs: float | None = None  # fraction of the original MACs to keep; with rank "auto" the ranks meet it
    global_ranking: bool = False
    scorer: str | None = None  # None: "pfp" when calibration data is given, else "l1" (see `scorer_name`)
    pfp_mode: str = "topk"  # pfp: keep the top channels, or "sample" them with the paper's re-weighting
    pfp_points: int | None = None  # pfp: (input, position) points per layer (None: from a work budget)
    calib_batch: int | None = None  # samples per activation-capture batch (None: from a memory budget)
    calib_samples: int | None = None  # use at most this many calibration samples
    preprocess: str | None = None  # for a directory of images: preset and/or key=value pairs (calib/images.py)
    round_to: int | None = None  # None: 8 for groups of 16+ channels, else 1
    exclude: tuple[str, ...] = ()
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calibration: CalibrationSet | str | os.PathLike | None = None
    seed: int = 0
    plan: Plan | None = None  # apply this plan instead of scoring and allocating
    evaluation: CalibrationSet | str | os.PathLike | None = None  # validate on this data (default: calibration)
    labels: object = None  # path or array of class indices for the evaluation data (else its own labels)
    gates: Gates | None = None  # limits the result must meet (report["gates"] says which failed)
    latency: LatencyConfig | None = None  # measure onnxruntime latency before/after (implied by a speedup gate)
    mobile: bool = False  # onnxruntime mobile usability check and .ort conversion
    recover: str | None = None  # none|bias|lstsq re-fit of changed layers; None: lstsq with calibration data, else none
    finetune_steps: int = 0  # distillation steps through onnxruntime-training after recovery (needs that package)
    finetune_lr: float = FINETUNE_LR


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: dict
    ort_model: bytes | None = None  # the result in onnxruntime's ORT format, with PruneConfig.mobile


@dataclass
class Loaded:
    """A normalised model with its static input shapes and inferred tensor shapes."""

    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]
    shapes: dict[str, tuple]
    size_bytes: int
    cost: dict = field(default_factory=dict)  # params and MACs, computed once
    file: ModelFile | None = None  # the file it came from: sessions and capture passes read it there

    @property
    def path(self) -> Path | None:
        return self.file.path if self.file is not None else None

    @property
    def runnable(self):
        return self.path if self.path is not None else self.model


def load(model: onnx.ModelProto | str | os.PathLike, input_shapes=None) -> Loaded:
    if isinstance(model, onnx.ModelProto):
        proto, size, file = normalize_model(model), model_size_bytes(model), None
    else:
        proto, size, file = load_model_file(model)
    resolved = resolve_input_shapes(proto, input_shapes)
    shapes = infer_shapes(proto, resolved)
    return Loaded(proto, resolved, shapes, size, model_cost(proto, resolved, shapes), file)


@dataclass
class Baseline:
    """What every pruning of one model shares, computed once: the loaded model, the calibration and
    evaluation data, and (on first use) the original's outputs and sessions. `prepare` makes one; a
    sweep passes it to `prune` for each setting instead of a path, so nothing is loaded or run twice."""

    loaded: Loaded
    specs: list
    calibration: CalibrationSet
    evaluation: CalibrationSet  # validation data: the calibration data unless other data was given
    _reference: dict | None = None
    _sessions: dict = field(default_factory=dict)
    _scores: dict = field(default_factory=dict)

    def session(self, threads: int = 0):
        if threads not in self._sessions:
            self._sessions[threads] = session(self.loaded.runnable, threads=threads)
        return self._sessions[threads]

    def scores(self, analysis, scorer: str, context, config: PruneConfig) -> dict:
        """`score(...)`, computed once per scorer and scoring options: the scores (and the statistics a
        scorer leaves in `context`) depend on the original model and data only, not on the ratio.
        While they are computed, a large model from a file is not held parsed (`released_model`)."""
        key = (scorer, config.seed, config.calib_batch, config.pfp_points, tuple(config.exclude))
        if key not in self._scores:
            before = len(context.notes)
            with released_model(self.loaded, analysis.graph) as model:
                context.model = model
                scores = score(analysis, scorer, context)
            context.model = self.loaded.model
            self._scores[key] = copy.deepcopy((scores, context.pfp, context.obs, context.notes[before:]))
            return scores
        scores, context.pfp, context.obs, notes = copy.deepcopy(self._scores[key])
        context.notes.extend(notes)
        return scores

    def reference(self) -> dict:
        """The original model's outputs on the evaluation data."""
        if self._reference is None:  # a session not kept for later holds no memory after this
            sess = self._sessions.get(0) or session(self.loaded.runnable)
            self._reference = run_model(sess, self.evaluation, run_batch_size(self.specs, self.loaded.shapes))
        return self._reference

    def single_batch(self) -> dict:
        """One feed (batch 1, or the model's fixed batch) for latency and the .ort check."""
        size = min(min([s.fixed_batch for s in self.specs if s.fixed_batch] or [1]), self.evaluation.count)
        return next(self.evaluation.head(size).batches(size))


def prepare(model, config: PruneConfig | None = None) -> Baseline:
    """Load `model` and its data once (input shapes, calibration, evaluation, labels from `config`)."""
    config = config or PruneConfig()
    loaded = load(model, config.input_shapes)
    specs = input_specs(loaded.model, loaded.input_shapes)
    calibration = _calibration(config, specs)
    evaluation = _evaluation(config, specs, calibration)
    check_gate_requirements(config.gates, evaluation.labels is not None)
    baseline = Baseline(loaded, specs, calibration, evaluation)
    if releasable(loaded):
        # onnxruntime needs about 3x a model's size to run it; with our parsed copy alive too, that
        # would be the job's peak. Run the original from its file without our copy, then parse again.
        with unparsed(loaded):
            baseline.reference()
    return baseline


def releasable(loaded: Loaded) -> bool:
    """Whether `loaded.model` is worth freeing while onnxruntime runs it: a large model from a file."""
    return loaded.model is not None and loaded.file is not None and loaded.size_bytes > RELOAD_ABOVE_BYTES


@contextmanager
def unparsed(loaded: Loaded):
    """`loaded.model` is None while the block runs (its memory handed back), parsed again from its file
    afterwards, also when the block raises."""
    loaded.model = None
    gc.collect()
    release_free_memory()
    try:
        yield
    finally:
        gc.collect()
        release_free_memory()  # what the block freed (an onnxruntime session), before parsing again
        loaded.model = loaded.file.load()


@contextmanager
def released_model(loaded: Loaded, graph: gs.Graph):
    """While the block runs, a model from a file above RELOAD_ABOVE_BYTES is not held parsed:
    `loaded.model` is None, `graph` (imported from it) is detached from it, and the block gets the
    `io.ModelFile` to read it from (capture passes accept either); afterwards the file is parsed again.
    Otherwise the block gets `loaded.model` and nothing changes. During a capture pass the weights are
    then held once by us (the graph's arrays) and once by onnxruntime, not also as a parsed proto."""
    if not releasable(loaded):
        yield loaded.model
        return
    detach_constants(graph)
    with unparsed(loaded):
        yield loaded.file


def detach_constants(graph: gs.Graph) -> None:
    """Make `graph` hold no part of the proto it was imported from: constants not yet loaded keep a
    copy of their TensorProto (what export writes back, unchanged), and the opset imports are copied.
    A message inside a python protobuf keeps the whole parsed model alive, whatever else is freed."""
    seen = set()

    def constant(tensor) -> None:
        lazy = tensor._values if isinstance(tensor, gs.Constant) else None
        if isinstance(lazy, gs.ir.tensor.LazyValues) and id(lazy) not in seen:
            seen.add(id(lazy))
            copy = lazy.tensor = _copied(lazy.tensor)
            if hasattr(lazy.shape, "extend"):  # graphsurgeon keeps the tensor's dims container as the shape
                lazy.shape = (copy.values if isinstance(copy, onnx.SparseTensorProto) else copy).dims

    def visit(value) -> None:
        if isinstance(value, gs.Graph):
            walk(value)
        elif isinstance(value, gs.Tensor):
            constant(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    def walk(g: gs.Graph) -> None:
        if id(g) in seen:
            return
        seen.add(id(g))
        g.import_domains = _copied_all(g.import_domains)
        for tensor in g.tensors().values():
            constant(tensor)
        for node in g.nodes:
            for value in node.attrs.values():
                visit(value)
        for function in getattr(g, "functions", []):
            walk(function)

    walk(graph)


def _copied(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _copied_all(messages):
    return None if messages is None else [_copied(m) for m in messages]


def _evaluation(config: PruneConfig, specs, calibration: CalibrationSet) -> CalibrationSet:
    data = config.evaluation
    if data is None:
        data = calibration
    elif not isinstance(data, CalibrationSet):
        data = load_calibration(data, specs)
        data.source = "evaluation"
    if config.labels is not None:
        if data.source == "synthetic":
            raise UsageError("--labels needs the inputs they label: give them with --calib or --eval")
        data = CalibrationSet(data.arrays, load_labels(config.labels, data.count), data.source)
    return data


def analyze_model(loaded: Loaded, exclude=()) -> Analysis:
    graph = gs.import_onnx(loaded.model)
    graph.import_domains = _copied_all(graph.import_domains)  # export may add to them: never to the model's
    fold_constants(graph)
    graph.toposort()
    return analyze(graph, loaded.shapes, exclude)


def fold_constants(graph: gs.Graph) -> None:
    """Evaluate subgraphs that depend only on constants (weights reshaped, transposed or cast by the
    exporter) so that handlers see constant weights. Shapes are not folded: dynamic dims stay dynamic."""
    if not any(node.inputs and all(isinstance(t, gs.Constant) for t in node.inputs) for node in graph.nodes):
        return  # nothing computes from constants alone
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
        **loaded.cost,
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
    """Prune channels of `model` (a path, a ModelProto, or a `Baseline` from `prepare` to reuse its
    loaded model, data and reference outputs) as `config` says; validate; report."""
    config = config or PruneConfig()
    if config.finetune_steps:
        from .recover.training import require_training

        require_training()  # fail before any work when onnxruntime-training is missing
    timings = {}
    started = time.perf_counter()
    baseline = model if isinstance(model, Baseline) else prepare(model, config)
    loaded, specs, calibration = baseline.loaded, baseline.specs, baseline.calibration
    baseline.reference()  # now, while the original is the only model in memory
    timings["load"] = time.perf_counter() - started

    t = time.perf_counter()
    analysis = analyze_model(loaded, config.exclude)
    lowrank = lowrank_settings(config)
    if not analysis.prunable_groups() and lowrank is None:
        raise NothingToPrune(nothing_prunable_message(analysis))
    timings["analyze"] = time.perf_counter() - t

    t = time.perf_counter()
    scorer = scorer_name(config, calibration)
    context = ScoringContext(seed=config.seed, calibration=calibration, model=loaded.model,
                             batch_size=config.calib_batch, pfp_points=config.pfp_points,
                             fixed_batch=min([s.fixed_batch for s in specs if s.fixed_batch] or [0]) or None)
    scales, budget = {}, None
    if config.plan is not None:
        keep = config.plan.to_keep(analysis)
        scales = config.plan.to_scales(analysis)
    elif lowrank is not None and channel_ratio(config) == 0:  # factorization alone: no scoring pass
        keep = {g.index: np.arange(g.channels) for g in analysis.prunable_groups()}
        scorer = "none"
    else:
        scores = baseline.scores(analysis, scorer, context, config)
        keep, scales, budget = choose_channels(
            analysis, scorer, scores, context, filters=channel_ratio(config), global_ranking=config.global_ranking,
            round_to=config.round_to, target_macs=config.target_macs if config.rank is None else None,
            pfp_mode=config.pfp_mode, seed=config.seed)
    plan = Plan.from_keep(analysis, keep, scales)
    timings["score"] = time.perf_counter() - t

    t = time.perf_counter()
    group_reports = [group_summary(g, len(keep[g.index]) if g.index in keep else None) for g in analysis.groups]
    coverage = analysis.coverage()
    masks = keep_masks(analysis, keep)
    apply_unit_scales(analysis, scales)
    apply_channel_plan(analysis, keep)
    pruned = gs.export_onnx(analysis.graph)
    pruned.ir_version = loaded.model.ir_version
    del analysis
    gc.collect()  # graphsurgeon graphs are reference cycles: free the weights now, not at some later gc
    timings["rewrite"] = time.perf_counter() - t

    lowrank_report = None
    if lowrank is not None:  # channels are pruned first, then layers are factorized
        t = time.perf_counter()
        pruned, plan.lowrank, lowrank_report = factorize_stage(pruned, baseline, lowrank, config)
        timings["lowrank"] = time.perf_counter() - t

    t = time.perf_counter()
    pruned, recovery_report = recover_stage(pruned, baseline, masks, config)
    timings["recover"] = time.perf_counter() - t

    if baseline is not model and loaded.path is not None:
        loaded.model = None  # not needed any more (and re-readable from its file): free it for validation
        gc.collect()
    t = time.perf_counter()
    report, ort_model = evaluate_result(baseline, pruned, config)
    timings["validate"] = time.perf_counter() - t
    report.update({
        "groups": group_reports,
        "coverage": coverage,
        "config": {"filters": config.filters, "global": config.global_ranking, "scorer": scorer,
                   "round_to": config.round_to, "exclude": list(config.exclude),
                   "input_shapes": loaded.input_shapes, "plan_given": config.plan is not None},
        "scoring_notes": context.notes,
        "scoring": scoring_summary(scorer, config, context, budget),
        "seed": config.seed,
        "version": __version__,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "schema_version": SCHEMA_VERSION,
    })
    report["config"].update(filters=channel_ratio(config), rank=config.rank, lowrank_error=config.lowrank_error,
                            target_macs=config.target_macs)
    if lowrank_report is not None:
        report["lowrank"] = lowrank_report
    report.update(recovery_report)
    report["gates"] = evaluate_gates(report, config.gates)
    return PruneResult(pruned, plan, report, ort_model)


def recovery_method(config: PruneConfig, calibration: CalibrationSet) -> str:
    method = config.recover or ("lstsq" if calibration.source != "synthetic" else "none")
    if method not in RECOVERY_METHODS:
        raise UsageError(f"unknown recovery method '{method}': choose one of {', '.join(RECOVERY_METHODS)}")
    return method


def recover_stage(pruned: onnx.ModelProto, baseline: Baseline, masks: dict, config: PruneConfig):
    """Re-fit the changed layers on the calibration data, then fine-tune when asked; (model, report keys)."""
    loaded, calibration = baseline.loaded, baseline.calibration
    method = recovery_method(config, calibration)
    pruned, recovery = recover(loaded.model, pruned, calibration, method, masks, loaded.shapes,
                               run_batch_size(baseline.specs, loaded.shapes), config.seed)
    if calibration.source == "synthetic" and method != "none":
        recovery["note"] = "fitted on synthetic inputs: give --calib with real samples for a meaningful fit"
    sections = {"recovery": recovery}
    if config.finetune_steps:
        from .recover.training import finetune  # needs onnxruntime-training, checked before any work

        pruned, sections["finetune"] = finetune(pruned, loaded.model, calibration, config.finetune_steps,
                                                lr=config.finetune_lr, batch_size=run_batch_size(baseline.specs),
                                                seed=config.seed)
        if calibration.source == "synthetic":
            sections["finetune"]["note"] = "trained on synthetic inputs: give --calib with real samples"
    return pruned, sections


def factorize(model, rank: float | str = "auto", **options) -> PruneResult:
    """Low-rank factorization alone (no channel removed): `prune` with `filters=0` and `rank`; other
    `PruneConfig` fields as keywords (calibration, lowrank_error, target_macs, ...)."""
    return prune(model, PruneConfig(filters=0.0, rank=rank, **options))


def channel_ratio(config: PruneConfig) -> float:
    """--filters as given; when not given, 0.5, or 0 when low-rank or a MACs target is asked for."""
    if config.filters is not None:
        return config.filters
    return 0.0 if config.rank is not None or config.target_macs is not None else 0.5


def scorer_name(config: PruneConfig, calibration: CalibrationSet) -> str:
    """The scorer asked for; by default pfp when calibration data was given, else l1."""
    if config.scorer:
        return config.scorer
    return "pfp" if calibration.source != "synthetic" else "l1"


def scoring_summary(scorer: str, config: PruneConfig, context: ScoringContext, budget: dict | None) -> dict:
    """Which scorer ran, on what data, and how the budget was met (for the report)."""
    summary = {"scorer": "plan" if config.plan is not None else scorer, "data": context.calibration.source,
               "samples": context.calibration.count}
    if scorer == "pfp" and config.plan is None:
        summary.update(pfp_mode=config.pfp_mode, points_per_layer=getattr(context.pfp, "points", None))
    if budget is not None:
        summary["budget"] = budget
    return summary


def lowrank_settings(config: PruneConfig) -> LowRankSettings | None:
    """What the factorization stage does, or None when it has nothing to do. A plan's ranks replace
    `rank`; a MACs target goes to the ranks with `rank="auto"` (to the channels without `rank`)."""
    if config.plan is not None:
        return LowRankSettings(plan=config.plan.lowrank, seed=config.seed) if config.plan.lowrank else None
    if config.rank is None:
        return None
    rank = check_rank(config.rank)
    if not 0 < config.lowrank_error < 1:
        raise UsageError(f"--lowrank-error {config.lowrank_error} is outside (0, 1): give a relative error, e.g. 0.1")
    target = config.target_macs
    if target is not None and rank != "auto":
        raise UsageError("--target-macs with --rank needs --rank auto (the ranks are then chosen to meet the "
                         "target): drop --target-macs or use --rank auto")
    if target is not None and not 0 < target <= 1:
        raise UsageError(f"--target-macs {target} is outside (0, 1]: give the fraction of MACs to keep, e.g. 0.5")
    return LowRankSettings(rank, config.lowrank_error, target, tuple(config.exclude), config.seed)


def factorize_stage(pruned: onnx.ModelProto, baseline: Baseline, settings: LowRankSettings, config: PruneConfig):
    """Factorize the channel-pruned model; (model, ranks for the plan, report section)."""
    loaded = baseline.loaded
    original_macs = loaded.cost["macs"]
    result = factorize_model(pruned, loaded.input_shapes, baseline.calibration, settings, original_macs,
                             run_batch_size(baseline.specs))
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


def _calibration(config: PruneConfig, specs) -> CalibrationSet:
    data = config.calibration
    if data is None:
        return synthetic(specs, SYNTHETIC_SAMPLES, config.seed)
    return load_calibration(data, specs, preprocess=config.preprocess, samples=config.calib_samples)


def run_batch_size(specs, shapes: dict | None = None) -> int:
    """Samples per onnxruntime run: the model's fixed batch, else RUN_BATCH, or fewer when the model's
    tensor `shapes` say a batch would need more than RUN_BUDGET_BYTES."""
    fixed = [s.fixed_batch for s in specs if s.fixed_batch]
    if fixed:
        return min(fixed)
    sizes = [int(np.prod(dims[1:], dtype=np.int64)) for dims in (shapes or {}).values()
             if dims and all(isinstance(d, int) and d > 0 for d in dims[1:])]
    per_sample = 4 * 4 * max(sizes, default=0)  # float32, four tensors of the largest size live at once
    return int(max(1, min(RUN_BATCH, RUN_BUDGET_BYTES // max(per_sample, 1))))


def validate(loaded: Loaded, pruned: onnx.ModelProto, calibration: CalibrationSet, specs, reference=None) -> dict:
    """Checker, onnxruntime outputs against the original on the same inputs (`reference`: the original's
    outputs when already known), cost before/after, and accuracy when the data has labels."""
    checker = check_model(pruned, loaded.runnable)
    batch = run_batch_size(specs, loaded.shapes)
    if reference is None:
        reference = run_model(session(loaded.runnable), calibration, batch)
    result = run_model(session(pruned), calibration, batch)
    after_shapes = infer_shapes(pruned, loaded.input_shapes)
    report = {
        "before": {**loaded.cost, "size_bytes": loaded.size_bytes},
        "after": {**model_cost(pruned, loaded.input_shapes, after_shapes), "size_bytes": model_size_bytes(pruned)},
        "fidelity": fidelity(reference, result),
        "data": {"source": calibration.source, "samples": calibration.count},
        "checker": checker,
    }
    if calibration.labels is not None:
        report["accuracy"] = labelled_evaluation(reference, result, calibration.labels)
    return report


def evaluate_result(baseline: Baseline, pruned: onnx.ModelProto, config: PruneConfig) -> tuple[dict, bytes | None]:
    """`validate` on the evaluation data, plus latency and the mobile check when asked for."""
    report = validate(baseline.loaded, pruned, baseline.evaluation, baseline.specs, baseline.reference())
    latency = config.latency or (LatencyConfig() if config.gates and config.gates.needs_latency else None)
    if latency is not None:
        report["latency"] = compare_latency(baseline.session(latency.threads), pruned, baseline.single_batch(), latency)
    ort_model = None
    if config.mobile:
        from .validate.mobile import check_mobile  # imports onnxruntime's tools only when asked

        report["mobile"], ort_model = check_mobile(pruned, baseline.single_batch())
    return report, ort_model


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
