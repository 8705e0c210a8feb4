"""Weight sparsity stage: zero the weights of Conv, Gemm and MatMul layers that matter least (and of
onnxruntime's FusedConvs, which `--no-simplify` leaves: each is the Conv it applies before its activation).

It runs last, on the channel-pruned (factorized, recovered) model, and removes no channel. Per layer, each
weight gets a cost (`solve.weight_costs`: the OBS saliency with calibration data, the magnitude without);
one threshold over all layers' costs, each relative to its layer's output, sets every layer's sparsity so
that the given share of all their weights go (`solve.allocate`); the pattern (`patterns`) decides which,
and with data the kept weights of every row are re-fitted optimally (`solve.optimal_update`). The input
statistics are those of the low-rank stage (`lowrank.covariance.input_moments`: E[x x^T] per layer, one
pass over the calibration data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..calib import CalibrationSet
from ..errors import UsageError
from ..io import export_graph, import_graph
from ..lowrank.covariance import input_moments
from ..lowrank.decompose import relative_error
from ..lowrank.layers import Layer, find_layers, layer_name
from ..shapes import infer_shapes
from .patterns import Pattern, keep_mask, parse_pattern, unit_costs
from .solve import allocate, optimal_update, weight_costs

log = logging.getLogger(__name__)

METHODS = ("obs", "magnitude")
MAX_FEATURES = 6144  # wider layers get magnitude costs: their [features, features] statistics take 300 MB each
LAYER_CEILING = 0.99  # no layer loses more than this share of its weights to the global budget


@dataclass
class SparsitySettings:
    sparsity: float  # share of the weights of the sparsified layers zeroed (N:M: 1 - N/M)
    pattern: Pattern = field(default_factory=lambda: Pattern("unstructured"))
    method: str = "obs"  # "obs" (needs calibration data) or "magnitude"
    exclude: tuple[str, ...] = ()
    seed: int = 0


def check_sparsity(sparsity: float | None, pattern: str | None, method: str | None) -> tuple[float, Pattern]:
    """(--sparsity, --sparsity-pattern) as values; a UsageError names the option at fault."""
    parsed = parse_pattern(pattern or "unstructured")
    if method is not None and method not in METHODS:
        raise UsageError(f"--sparsity-method {method!r}: choose {' or '.join(METHODS)}")
    fixed = parsed.fixed_sparsity
    if sparsity is None:
        if fixed is None:
            raise UsageError(f"--sparsity-pattern {parsed} needs --sparsity S: the share of weights to zero, e.g. 0.5")
        return fixed, parsed
    if not 0.0 < sparsity < 1.0:
        raise UsageError(f"--sparsity {sparsity} is outside (0, 1): give the share of weights to zero, e.g. 0.5")
    if fixed is not None and abs(sparsity - fixed) > 1e-9:
        raise UsageError(f"--sparsity {sparsity} disagrees with --sparsity-pattern {parsed}, which zeroes "
                         f"{fixed:g} of the weights: drop --sparsity or give {fixed:g}")
    return sparsity, parsed


@dataclass
class SparsityResult:
    model: onnx.ModelProto
    report: dict
    sparsified: tuple[str, ...]  # the weight initializers of `model` this stage zeroed weights of
    dense: dict[str, np.ndarray]  # with `keep_dense`: per sparsified initializer, its values before this stage


def sparsify_model(model: onnx.ModelProto, input_shapes: dict, calibration: CalibrationSet,
                   settings: SparsitySettings, batch_size: int = 32, grams: dict | None = None,
                   keep_dense: bool = False) -> SparsityResult:
    """`model` (not modified) with weights zeroed as `settings` say, and the report section. `grams`: the
    layers' input moments when already computed for this model (else measured here); `keep_dense`: also
    the weights before (splicing's start; a copy of every sparsified weight, so only when asked)."""
    shapes = infer_shapes(model, input_shapes)
    graph = import_graph(model)
    layers = find_layers(graph, shapes, settings.exclude, factorizing=False)
    for layer in layers:
        if layer.layout is not None and layer.layout.groups != 1:  # the low-rank stage's reason speaks of factors
            layer.reason = f"grouped conv (group={layer.layout.groups}): not sparsified yet"
        elif not layer.reason:
            layer.reason = settings.pattern.fits(layer.out_features, layer.in_features)
    candidates = [layer for layer in layers if not layer.reason]
    if not candidates:
        hint = "" if str(settings.pattern) == "unstructured" else "; try --sparsity-pattern unstructured"
        raise UsageError("--sparsity: no Conv, Gemm or MatMul layer takes the pattern "
                         f"{settings.pattern} ({_top_reason(layers)}){hint}")
    if settings.method != "obs" or calibration.source == "synthetic":
        grams = {}
    elif grams is None:
        grams = input_moments(model, candidates, shapes, calibration, batch_size, settings.seed, MAX_FEATURES)
    weights = [layer.weight.T for layer in candidates]  # [outputs, features]
    costs = [weight_costs(w, grams.get(layer.name)) for w, layer in zip(weights, candidates)]
    fixed = settings.pattern.fixed_sparsity
    fractions = ([fixed] * len(candidates) if fixed is not None else
                 allocate([unit_costs(c, settings.pattern) for c in costs],
                          [int(np.prod(settings.pattern.unit_shape()))] * len(candidates),
                          settings.sparsity, LAYER_CEILING))
    nodes = {layer_name(node): node for node in graph.nodes}
    rows, dense = [], {}
    for layer, weight, cost, fraction in zip(candidates, weights, costs, fractions):
        keep = keep_mask(cost, settings.pattern, fraction)
        gram = grams.get(layer.name)
        new = optimal_update(weight, keep, gram) if gram is not None else np.where(keep, weight, 0.0)
        before = np.array(nodes[layer.name].inputs[1].values) if keep_dense else None
        name = _write(nodes[layer.name], layer, new)
        dense[name] = before
        rows.append(_row(layer, keep, relative_error(weight.T, new.T, gram), gram is not None)
                    | {"op": nodes[layer.name].op, "initializer": name})
    rows += [{"node": layer.name, "op": nodes[layer.name].op, "status": "skipped", "reason": layer.reason}
             for layer in layers if layer.reason]
    out = export_graph(graph)
    out.ir_version = model.ir_version
    report = _report(rows, settings, bool(grams))
    log.info("sparsity: %.1f%% of %d weights zeroed in %d layers", 100 * report["achieved"], report["weights"],
             report["sparsified"])
    return SparsityResult(out, report, tuple(dense), dense if keep_dense else {})


def _write(node: gs.Node, layer: Layer, matrix: np.ndarray) -> str:
    """The layer's weight tensor for `matrix` [outputs, features] (Gemm's alpha taken out again); its name."""
    values = layer.handler.from_matrix(layer.layout, matrix.T[None] / layer.layout.scale)
    name = f"{layer.name}_sparse_weight"
    node.inputs[1] = gs.Constant(name, values.astype(layer.weight_dtype))
    return name


def _row(layer: Layer, keep: np.ndarray, error: float, data_aware: bool) -> dict:
    return {"node": layer.name, "op": layer.op, "status": "sparsified", "weights": int(keep.size),
            "zeros": int(keep.size - keep.sum()), "sparsity": float(1 - keep.mean()), "rel_error": error,
            "data_aware": data_aware}


def _top_reason(layers: list[Layer]) -> str:
    reasons = [layer.reason for layer in layers if layer.reason]
    return max(set(reasons), key=reasons.count) if reasons else "none found"


def _report(rows: list[dict], settings: SparsitySettings, data_aware: bool) -> dict:
    done = [r for r in rows if r["status"] == "sparsified"]
    weights, zeros = sum(r["weights"] for r in done), sum(r["zeros"] for r in done)
    return {"method": settings.method if data_aware else "magnitude", "pattern": str(settings.pattern),
            "target": settings.sparsity, "achieved": zeros / max(weights, 1), "weights": weights, "zeros": zeros,
            "sparsified": len(done), "skipped": len(rows) - len(done),
            "worst_error": max((r["rel_error"] for r in done), default=0.0),
            "error_measure": ("relative output error on the calibration inputs" if data_aware
                              else "relative Frobenius error of the weights"),
            "layers": rows}


def recount(report: dict, model: onnx.ModelProto) -> None:
    """The report's zeros and sparsity per layer and in all, as `model`'s weights have them now (after
    fine-tuning, where splicing may have brought weights back)."""
    names = {row.get("initializer") for row in report["layers"]}
    zeros = {t.name: int(np.count_nonzero(numpy_helper.to_array(t) == 0))
             for t in model.graph.initializer if t.name in names}
    for row in report["layers"]:
        if row["status"] == "sparsified" and row["initializer"] in zeros:
            row["zeros"] = zeros[row["initializer"]]
            row["sparsity"] = row["zeros"] / row["weights"]
    done = [r for r in report["layers"] if r["status"] == "sparsified"]
    report["zeros"] = sum(r["zeros"] for r in done)
    report["achieved"] = report["zeros"] / max(report["weights"], 1)


__all__ = ["METHODS", "SparsitySettings", "check_sparsity", "parse_pattern", "recount", "sparsify_model"]
