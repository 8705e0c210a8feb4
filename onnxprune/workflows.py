"""The library's other workflows, each composed of the same stages as `prune`: `inspect` (analysis
only), `factorize` (low-rank alone) and `finetune` (distil the original into a pruned model, validated
like `prune`)."""

from __future__ import annotations

import onnx

from .baseline import prepare
from .config import PruneConfig
from .io import load_model
from .loading import load
from .pipeline import PruneResult, prune
from .plan import Plan
from .recover.training import finetune as distil
from .report import report_header
from .stages import analyze_model, group_summary
from .validate.gates import evaluate_gates
from .validate.result import evaluate_result


def inspect(model, input_shapes=None, exclude=(), hidden: bool = False, simplify: bool = True) -> dict:
    """Groups, coverage and cost of a model, as plain data (what `onnxprune inspect` prints); `hidden`,
    `simplify`: as in `PruneConfig`."""
    loaded = load(model, input_shapes, runs=False, simplify=simplify)  # analysis only: no session unless shapes need one
    analysis = analyze_model(loaded, exclude, hidden)
    return {
        "groups": [group_summary(g) for g in analysis.groups],
        "coverage": analysis.coverage(),
        "simplified": loaded.simplified,
        **loaded.given_cost,
        "size_bytes": loaded.size_bytes,
        "input_shapes": loaded.input_shapes,
    }


def factorize(model, rank: float | str = "auto", **options) -> PruneResult:
    """Low-rank factorization alone (no channel removed): `prune` with `filters=0` and `rank`; other
    `PruneConfig` fields as keywords (calibration, lowrank_error, target_macs, ...)."""
    return prune(model, PruneConfig(filters=0.0, rank=rank, **options))


def finetune(model, teacher, config: PruneConfig, loss: str = "mse", frozen: tuple[str, ...] = ()) -> PruneResult:
    """`onnxprune finetune`: distil `teacher` into `model` on `config.calibration`, then validate the
    result against the teacher exactly as `prune` validates its output."""
    baseline = prepare(teacher, config)
    student = model if isinstance(model, onnx.ModelProto) else load_model(model)
    tuned, section = distil(student, baseline.loaded.model, baseline.fit_data, config.finetune_steps,
                            config.finetune_lr, baseline.largest_batch, config.seed, loss, frozen)
    report, ort_model = evaluate_result(baseline, tuned, config.gates, config.latency, config.mobile)
    report.update({**report_header(), "finetune": section, "seed": config.seed,
                   "config": {"finetune_steps": config.finetune_steps, "finetune_lr": config.finetune_lr,
                              "loss": loss, "frozen": list(frozen)}})
    report["gates"] = evaluate_gates(report, config.gates)
    return PruneResult(tuned, Plan(), report, ort_model)
