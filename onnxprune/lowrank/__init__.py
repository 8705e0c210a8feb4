"""Low-rank factorization stage: find layers, gather input statistics, choose ranks, rewrite the graph.

It runs on the model that comes out of channel pruning (channels are pruned first, then layers are
factorized) and returns the rewritten model, the ranks chosen (for the Plan) and the report section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from ..calib import CalibrationSet
from ..errors import UsageError
from ..io import export_graph, import_graph
from ..plan import LowRankPlan
from .factorizer import Factorizer
from ..shapes import infer_shapes
from ..validate.cost import model_cost
from .covariance import input_moments
from .decompose import Decomposition, decompose, relative_error
from .layers import Layer, find_layers
from .rank import Choice, Options, by_budget, by_error, by_fraction

log = logging.getLogger(__name__)

DEFAULT_MAX_ERROR = 0.1


@dataclass
class LowRankSettings:
    rank: float | str | None = None  # fraction of each layer's rank, "auto", or None (apply `plan` only)
    max_error: float = DEFAULT_MAX_ERROR  # --lowrank-error: per-layer relative error for "auto"
    target_macs: float | None = None  # with "auto": keep this fraction of `original_macs` overall
    exclude: tuple[str, ...] = ()
    seed: int = 0
    plan: list[LowRankPlan] | None = None  # apply these ranks instead of choosing


@dataclass
class LowRankResult:
    model: onnx.ModelProto
    plan: list[LowRankPlan]
    report: dict = field(default_factory=dict)


def check_rank(rank) -> float | str:
    """`--rank` value: a fraction in (0, 1] or "auto"."""
    if isinstance(rank, str) and rank.strip().lower() == "auto":
        return "auto"
    try:
        value = float(rank)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise UsageError(f"--rank {rank!r} is neither a fraction in (0, 1] nor 'auto': e.g. --rank 0.5 or --rank auto")
    return value


def factorize_model(model: onnx.ModelProto, input_shapes: dict[str, list[int]], calibration: CalibrationSet,
                    settings: LowRankSettings, original_macs: int | None = None,
                    batch_size: int = 32) -> LowRankResult:
    """Factorize the layers of `model` (not modified) as `settings` say."""
    shapes = infer_shapes(model, input_shapes)
    graph = import_graph(model)
    layers = find_layers(graph, shapes, settings.exclude)
    candidates = [layer for layer in layers if not layer.reason]
    data_aware = calibration.source != "synthetic"
    needing_data = _layers_needing_data(candidates, settings) if data_aware else []
    moments = input_moments(model, needing_data, shapes, calibration, batch_size, settings.seed) if needing_data else {}
    current_macs = model_cost(model, input_shapes, shapes)["macs"]
    choices, decompositions, mode_info = _choose(candidates, moments, settings, current_macs,
                                                 original_macs or current_macs)
    factorizer = Factorizer(graph)
    entries, rows = [], []
    for layer in layers:
        choice = choices.get(layer.name)
        if isinstance(choice, Choice):
            dec = decompositions[layer.name][choice.subspaces]
            factorizer.replace(layer, *dec.factors(choice.rank))
            error = relative_error(layer.weight, dec.approximation(choice.rank), moments.get(layer.name))
            entries.append(LowRankPlan(layer.name, choice.rank, choice.subspaces))
            rows.append(_factorized_row(layer, choice, dec, error, layer.name in moments))
        else:
            reason = layer.reason or (choice if isinstance(choice, str) else "not in the plan")
            rows.append({"node": layer.name, "op": layer.op, "status": "skipped", "reason": reason})
    factorizer.finish()
    out = export_graph(graph)
    out.ir_version = model.ir_version
    report = _report(rows, mode_info, data_aware, moments)
    log.info("low-rank: %d of %d layers factorized (worst error %.3g, %s)", report["factorized"], len(rows),
             report["worst_error"], report["error_measure"])
    return LowRankResult(out, entries, report)


def _layers_needing_data(candidates: list[Layer], settings: LowRankSettings) -> list[Layer]:
    """The layers whose factors (or rank choice) the calibration statistics can change."""
    if settings.plan is not None:
        planned = {entry.node for entry in settings.plan}
        return [layer for layer in candidates if layer.name in planned]
    if settings.rank is None:
        return []
    if settings.rank == "auto":
        return candidates
    return [layer for layer in candidates if by_fraction(layer, settings.rank)[0] is not None]


def _choose(candidates: list[Layer], moments, settings: LowRankSettings, current_macs: int, original_macs: int):
    """({layer name: Choice or skip reason}, {layer name: {j: Decomposition}}, notes for the report)."""
    decs: dict[str, dict[int, Decomposition]] = {}

    def decompositions(layer: Layer, subspaces) -> dict[int, Decomposition]:
        decs[layer.name] = {j: decompose(layer.weight, moments.get(layer.name), j) for j in subspaces}
        return decs[layer.name]

    if settings.plan is not None:
        return _from_plan(candidates, settings.plan, decompositions), decs, {"mode": "plan"}
    rank = settings.rank
    if rank is None:
        return {}, decs, {"mode": "none"}
    if rank != "auto":
        picked = {}
        for layer in candidates:
            choice, why = by_fraction(layer, rank)
            if choice is not None:  # decompose only the layers where the rank pays
                choice.error = float(decompositions(layer, (1,))[1].errors[choice.rank])
            picked[layer.name] = choice or why
        return picked, decs, {"mode": "fraction", "rank": rank}
    options = [Options.of(layer, decompositions(layer, layer.subspace_options)) for layer in candidates]
    if settings.target_macs is None:
        picked = {o.layer.name: by_error(o, settings.max_error) for o in options}
        info = {"mode": "auto", "max_error": settings.max_error}
        return {name: c or why for name, (c, why) in picked.items()}, decs, info
    needed = current_macs - int(settings.target_macs * original_macs)
    chosen, level = by_budget(options, needed)
    saved = sum(o.layer.macs() - o.layer.macs(c.rank, c.subspaces) for o in options if (c := chosen.get(o.layer.name)))
    info = {"mode": "budget", "target_macs": settings.target_macs, "error_level": level,
            "macs_needed": int(max(needed, 0)), "macs_saved": int(saved), "reached": bool(saved >= needed)}
    why = "the MACs target was met without it" if saved >= needed else "no option lowers its cost"
    return {o.layer.name: chosen.get(o.layer.name, why) for o in options}, decs, info


def _from_plan(candidates: list[Layer], plan: list[LowRankPlan], decompositions) -> dict:
    by_name = {layer.name: layer for layer in candidates}
    chosen = {}
    for entry in plan:
        layer = by_name.get(entry.node)
        if layer is None or entry.subspaces not in layer.subspace_options \
                or not 1 <= entry.rank <= layer.full_rank(entry.subspaces):
            raise UsageError(f"the plan factorizes layer {entry.node!r} at rank {entry.rank} with {entry.subspaces} "
                             "subspace(s), which this model cannot: was the plan made for another model?")
        dec = decompositions(layer, (entry.subspaces,))[entry.subspaces]
        chosen[layer.name] = Choice(entry.rank, entry.subspaces, float(dec.errors[entry.rank]))
    return chosen


def _factorized_row(layer: Layer, choice: Choice, dec: Decomposition, error: float, data_aware: bool) -> dict:
    return {
        "node": layer.name, "op": layer.op, "status": "factorized",
        "rank": choice.rank, "full_rank": dec.max_rank, "subspaces": choice.subspaces,
        "rel_error": error, "data_aware": data_aware,
        "macs_before": layer.macs(), "macs_after": layer.macs(choice.rank, choice.subspaces),
        "params_before": layer.weight_params(), "params_after": layer.weight_params(choice.rank, choice.subspaces),
    }


def _report(rows: list[dict], mode_info: dict, data_aware: bool, moments) -> dict:
    done = [r for r in rows if r["status"] == "factorized"]
    return {
        **mode_info,
        "data_aware": bool(data_aware and moments),
        "error_measure": ("relative output error on the calibration inputs" if data_aware and moments
                          else "relative Frobenius error of the weights"),
        "factorized": len(done),
        "skipped": len(rows) - len(done),
        "worst_error": max((r["rel_error"] for r in done), default=0.0),
        "layers": rows,
    }
