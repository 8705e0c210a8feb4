"""What a pruning run is asked to do (`PruneConfig`), its range checks, and the defaults that depend on
the data given. Every value is checked here, once, before any work (`check_config`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .calib import CalibrationSet
from .errors import UsageError
from .lowrank import DEFAULT_MAX_ERROR, LowRankSettings, check_rank
from .plan import Plan
from .recover import FINETUNE_LR, METHODS as RECOVERY_METHODS
from .scoring import SCORERS
from .quantize import check_quantize
from .sparsity import SparsitySettings, check_sparsity
from .sparsity.storage import INDEX_FORMS
from .validate.gates import Gates
from .validate.latency import LatencyConfig

PFP_MODES = ("topk", "sample")
# obs's channels chosen again: on round one's stream re-fitted (True) or masked, or group after group (sequential)
RESELECT_MODES = (False, True, "masked", "sequential")


@dataclass
class PruneConfig:
    filters: float | None = None  # fraction of channels removed (per group, or overall with global_ranking);
    # None: 0.5, or 0 when `rank` or `target_macs` is given (see `channel_ratio`)
    rank: float | str | None = None  # low-rank factorization after channel pruning: fraction of each layer's rank, or "auto"
    lowrank_error: float = DEFAULT_MAX_ERROR  # with rank "auto": each layer's largest relative error
    target_macs: float | None = None  # fraction of the original MACs to keep; with rank "auto" the ranks meet it
    target_latency: float | None = None  # ms the result must run in, as the latency model predicts and measured
    target_speedup: float | None = None  # or: the original's measured ms divided by this
    predict_latency: bool = False  # build the latency model (implied by a latency target) and report its error
    latency_cache: str | os.PathLike | None = None  # the latency model's layer fits are cached in this file
    global_ranking: bool = False
    scorer: str | None = None  # None: "pfp" when calibration data is given, else "l1" (see `scorer_name`)
    pfp_mode: str = "topk"  # pfp: keep the top channels, or "sample" them with the paper's re-weighting
    pfp_points: int | None = None  # pfp: (input, position) points per layer (None: from a work budget)
    calib_batch: int | None = None  # samples per activation-capture batch (None: from a memory budget)
    calib_samples: int | None = None  # use at most this many calibration samples
    preprocess: str | None = None  # for a directory of images: preset and/or key=value pairs (calib/images.py)
    round_to: int | str | None = None  # None: 8 for groups of 16+ channels, else 1; "auto": the latency model's
    exclude: tuple[str, ...] = ()
    hidden: bool = False  # also prune the residual width through LayerNormalization (inexact; `--hidden`)
    simplify: bool = True  # apply the exact rewrites of ops.rules when the model is loaded (`--no-simplify`: off)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calibration: CalibrationSet | str | os.PathLike | None = None
    seed: int = 0
    plan: Plan | None = None  # apply this plan instead of scoring and allocating
    evaluation: CalibrationSet | str | os.PathLike | None = None  # validate on this data (default: calibration)
    labels: object = None  # path or array of class indices for the evaluation data (else its own labels)
    output_axes: dict[str, int] = field(default_factory=dict)  # per-channel fidelity: the channel axis of
    # outputs where it is not axis 1 (NHWC, [batch, anchors, values])
    gates: Gates | None = None  # limits the result must meet (report["gates"] says which failed)
    latency: LatencyConfig | None = None  # measure onnxruntime latency before/after (implied by a speedup gate)
    mobile: bool = False  # onnxruntime mobile usability check and .ort conversion
    recover: str | None = None  # none|bias|lstsq re-fit of changed layers; None: lstsq with calibration data, else none
    reselect: bool | str = False  # obs: re-choose each group's channels on the pruned stream (RESELECT_MODES,
    # scoring/reselect.py)
    steps: int = 1  # reach the target in this many prune-and-recover steps, re-scoring after each
    finetune_steps: int = 0  # distillation steps through onnxruntime-training after recovery (needs that package)
    finetune_lr: float = FINETUNE_LR
    sparsity: float | None = None  # share of the weights of Conv/Gemm/MatMul layers to zero, last (after recovery)
    sparsity_pattern: str | None = None  # unstructured (default), N:M or block:RxC
    sparsity_method: str | None = None  # obs or magnitude; None: obs with calibration data, else magnitude
    splicing: bool = False  # with --sparsity and fine-tuning: pruned weights may come back (Dynamic Network Surgery)
    sparse_index: str = "int64"  # stored sparse indices: int64 (valid ONNX) or smallest (onnxruntime only)
    quantize: str | None = None  # "int8": hand the result to onnxruntime's static QDQ quantization
    quantize_exclude: tuple[str, ...] = ()  # node name globs left float by the quantization


def check_filters(filters: float) -> None:
    if not 0.0 <= filters < 1.0:
        raise UsageError(f"--filters {filters} is outside [0, 1): give the fraction of channels to remove, e.g. 0.5")


def check_config(config: PruneConfig) -> None:
    """Every range and choice of `config`, checked before any work; a UsageError names the option."""
    if config.filters is not None:
        check_filters(config.filters)
    if config.target_macs is not None and not 0.0 < config.target_macs <= 1.0:
        raise UsageError(f"--target-macs {config.target_macs} is outside (0, 1]: give the fraction of MACs to keep, "
                         "e.g. 0.5")
    check_latency_target(config)
    if isinstance(config.seed, bool) or not isinstance(config.seed, (int, np.integer)) or config.seed < 0:
        raise UsageError(f"--seed {config.seed!r}: give a non-negative integer")
    check_round_to(config)
    if config.steps < 1:
        raise UsageError(f"--steps {config.steps}: give a positive number of steps")
    if channel_steps(config) > 1 and (config.plan is not None or config.pfp_mode == "sample" or config.rank is not None):
        raise UsageError("--steps prunes channels step by step: it cannot apply a --plan-in, compose --pfp-mode "
                         "sample's weight scales or share a budget with --rank; use one step")
    if config.pfp_mode == "sample" and config.scorer not in (None, "pfp"):
        raise UsageError(f"--pfp-mode sample is PFP's: it needs --scorer pfp (or no --scorer), not {config.scorer}")
    if config.pfp_mode not in PFP_MODES:
        raise UsageError(f"--pfp-mode {config.pfp_mode!r}: choose {' or '.join(PFP_MODES)}")
    if config.recover is not None and config.recover not in RECOVERY_METHODS:
        raise UsageError(f"unknown recovery method '{config.recover}': choose one of {', '.join(RECOVERY_METHODS)}")
    if sparsity_asked(config):
        check_schedule(config, *check_sparsity(config.sparsity, config.sparsity_pattern, config.sparsity_method))
    elif config.splicing:
        raise UsageError("--splicing decides which zeroed weights come back: it needs --sparsity S")
    if config.reselect not in RESELECT_MODES:
        raise UsageError(f"reselect={config.reselect!r}: give True (the pruned stream re-fitted), 'masked' or "
                         "'sequential' (group after group, on the stream of the groups chosen before)")
    if config.reselect and config.scorer not in (None, "obs"):
        raise UsageError(f"reselect re-chooses obs's channels: it needs the obs scorer, not {config.scorer}")
    if config.sparse_index not in INDEX_FORMS:
        raise UsageError(f"--sparse-index {config.sparse_index!r}: choose {' or '.join(INDEX_FORMS)}")
    if config.sparse_index != "int64" and not sparsity_asked(config):
        raise UsageError(f"--sparse-index {config.sparse_index} says how zeroed weights are stored: it needs --sparsity S")
    if config.sparsity_method == "obs" and config.calibration is None:
        raise UsageError("--sparsity-method obs needs --calib data: the saliencies are measured on it; give --calib "
                         "or use --sparsity-method magnitude")
    check_quantize(config.quantize)
    if config.quantize_exclude and not config.quantize:
        raise UsageError("--quantize-exclude names nodes to leave float in --quantize int8: add --quantize int8")
    if config.quantize and config.calibration is None:
        raise UsageError("--quantize needs --calib data: the int8 activation ranges are measured on it")
    if config.plan is None and config.rank is not None:
        rank = check_rank(config.rank)
        if not 0 < config.lowrank_error < 1:
            raise UsageError(f"--lowrank-error {config.lowrank_error} is outside (0, 1): give a relative error, "
                             "e.g. 0.1")
        if config.target_macs is not None and rank != "auto":
            raise UsageError("--target-macs with --rank needs --rank auto (the ranks are then chosen to meet the "
                             "target): drop --target-macs or use --rank auto")


def check_schedule(config: PruneConfig, sparsity: float, pattern) -> None:
    """--steps and --splicing with --sparsity: the steps raise the weights' sparsity (the channels are
    pruned in one step), and splicing needs fine-tuning steps and the unstructured pattern."""
    if config.steps > 1 and pattern.fixed_sparsity is not None:
        raise UsageError(f"--steps raises the sparsity step by step, but --sparsity-pattern {pattern} fixes it: "
                         "use one step (with --finetune-steps to fine-tune it)")
    if config.splicing and not config.finetune_steps:
        raise UsageError("--splicing acts during fine-tuning: give --finetune-steps K")
    if config.splicing and pattern.kind != "unstructured":
        raise UsageError(f"--splicing brings single weights back, which breaks --sparsity-pattern {pattern}: "
                         "use the unstructured pattern")


def check_latency_target(config: PruneConfig) -> None:
    latency, speedup = config.target_latency, config.target_speedup
    if config.predict_latency and channel_steps(config) > 1:
        raise UsageError("--predict-latency predicts one step's result: use one step")
    if latency is None and speedup is None:
        return
    if latency is not None and speedup is not None:
        raise UsageError("--target-latency and --target-speedup are two ways to say one budget: give one")
    if latency is not None and not latency > 0:
        raise UsageError(f"--target-latency {latency} is not a time: give the milliseconds to reach, e.g. 20")
    if speedup is not None and not speedup > 1:
        raise UsageError(f"--target-speedup {speedup} asks for no speed-up: give a factor above 1, e.g. 1.5")
    clash = [name for name, given in (("--target-macs", config.target_macs is not None),
                                      ("--filters", config.filters is not None), ("--rank", config.rank is not None),
                                      ("--plan-in", config.plan is not None), ("--steps", channel_steps(config) > 1))
             if given]
    if clash:
        raise UsageError(f"a latency target is the whole budget: it cannot be combined with {', '.join(clash)}; "
                         "drop one")


def check_round_to(config: PruneConfig) -> None:
    round_to = config.round_to
    if round_to == "auto":
        if channel_steps(config) > 1:
            raise UsageError("--round-to auto rounds to the multiples the latency model measured on the original: "
                             "use one step, or a number")
        if config.plan is not None:
            raise UsageError("--round-to auto rounds the channel counts, but --plan-in fixes them: drop --round-to")
        return
    if round_to is not None and (isinstance(round_to, (str, bool)) or not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"--round-to {round_to!r}: give a positive number of channels, or auto")


def latency_wanted(config: PruneConfig) -> bool:
    """Whether the run builds the latency model (--round-to auto reads its multiples)."""
    return (config.predict_latency or config.target_latency is not None or config.target_speedup is not None
            or config.round_to == "auto")


def channel_ratio(config: PruneConfig) -> float:
    """--filters as given; when not given, 0.5, or 0 when low-rank, sparsity or a MACs target is asked for."""
    if config.filters is not None:
        return config.filters
    return 0.0 if config.rank is not None or config.target_macs is not None or sparsity_asked(config) else 0.5


def scorer_name(config: PruneConfig, calibration: CalibrationSet) -> str:
    """The scorer asked for; by default obs when calibration data was given (it leads bench/eval_scoring.py's
    table at equal MACs with recovery; README), else l1."""
    if config.scorer:
        return config.scorer
    if config.pfp_mode == "sample":  # asked for PFP's sampling by name
        return "pfp"
    return "obs" if calibration.source != "synthetic" else "l1"


def recovery_method(config: PruneConfig, calibration: CalibrationSet) -> str:
    """The recovery asked for; by default lstsq when calibration data was given, else none."""
    return config.recover or ("lstsq" if calibration.source != "synthetic" else "none")


def fits_calibration(config: PruneConfig, calibration: CalibrationSet) -> bool:
    """Whether some stage fits to the calibration data: a scorer that reads it, recovery, factorization
    (data-aware with real data) or fine-tuning."""
    if calibration.source == "synthetic":
        return False
    scorer = SCORERS.get(scorer_name(config, calibration))  # an unknown name is refused by the scoring stage
    scored_on_data = config.plan is None and (scorer is None or scorer.uses_data)
    return (scored_on_data or recovery_method(config, calibration) != "none" or config.rank is not None
            or config.finetune_steps > 0 or (sparsity_asked(config) and config.sparsity_method != "magnitude"))


def lowrank_settings(config: PruneConfig) -> LowRankSettings | None:
    """What the factorization stage does, or None when it has nothing to do. A plan's ranks replace
    `rank`; a MACs target goes to the ranks with `rank="auto"` (to the channels without `rank`)."""
    if config.plan is not None:
        return LowRankSettings(plan=config.plan.lowrank, seed=config.seed) if config.plan.lowrank else None
    if config.rank is None:
        return None
    return LowRankSettings(check_rank(config.rank), config.lowrank_error, config.target_macs, tuple(config.exclude),
                           config.seed)


def sparsity_asked(config: PruneConfig) -> bool:
    return config.sparsity is not None or config.sparsity_pattern is not None


def channel_steps(config: PruneConfig) -> int:
    """The steps channels are pruned in: with --sparsity, --steps is the weights' schedule and channels take one."""
    return 1 if sparsity_asked(config) else config.steps


def sparsity_settings(config: PruneConfig, calibration: CalibrationSet) -> SparsitySettings | None:
    """What the sparsity stage does, or None without --sparsity / --sparsity-pattern. The method defaults
    to obs with calibration data, else magnitude."""
    if not sparsity_asked(config):
        return None
    sparsity, pattern = check_sparsity(config.sparsity, config.sparsity_pattern, config.sparsity_method)
    method = config.sparsity_method or ("obs" if calibration.source != "synthetic" else "magnitude")
    return SparsitySettings(sparsity, pattern, method, tuple(config.exclude), config.seed)


def config_section(config: PruneConfig, scorer: str, input_shapes: dict) -> dict:
    """The report's "config": the settings as resolved (defaults filled in)."""
    return {"filters": channel_ratio(config), "global": config.global_ranking, "scorer": scorer,
            "round_to": config.round_to, "exclude": list(config.exclude), "hidden": config.hidden,
            "simplify": config.simplify, "input_shapes": input_shapes,
            "plan_given": config.plan is not None, "rank": config.rank, "lowrank_error": config.lowrank_error,
            "target_macs": config.target_macs, "target_latency": config.target_latency,
            "target_speedup": config.target_speedup, "output_axes": dict(config.output_axes),
            "sparsity": config.sparsity, "sparsity_pattern": config.sparsity_pattern, "splicing": config.splicing,
            "sparse_index": config.sparse_index, "quantize": config.quantize, "reselect": config.reselect}
