"""How far a model can be pruned (`onnxprune inspect --limits`): at a given output error, the largest share
of each channel group's channels and of each layer's weights that can go, and the whole model's curves.

Every figure comes from a curve the pruning stages compute anyway, on the calibration data:

- channel groups: the obs scorer's error curves (`scoring.obs`: the greedy structured-OBS removal, its
  squared relative error at the model's outputs, measured with the group alone cut at a few shares and
  interpolated in between); a group's limit is the most channels removed with the curve at or below E^2.
- layers (weight sparsity): each layer's OBS weight saliencies (`sparsity.solve.weight_costs`), sorted
  and summed: the squared relative error of the layer's *own* output with the cheapest weights removed
  one by one (each with the optimal update of its row's other weights; the sum of single removals, which
  `sparsity` then refits jointly); the limit is the largest share with the sum at or below E^2.
- the whole model, channels: the groups' curves merged cheapest error increment first (the groups' errors
  taken as adding up), against the share of all prunable channels removed.
- the whole model, weights: measured, the relative L2 error of the model's outputs on the evaluation data
  with `--sparsity s` (obs, one global budget) applied at the shares in WEIGHT_SHARES.

E is a relative L2 error of the outputs, as the report's `fidelity.rel_l2`.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np

from .baseline import prepare
from .config import PruneConfig
from .errors import UsageError
from .graph import Analysis
from .io import import_graph
from .lowrank.covariance import input_moments
from .recover.passes import output_error
from .runtime import session
from .shapes import infer_shapes
from .lowrank.layers import find_layers
from .sparsity import MAX_FEATURES as SPARSITY_FEATURES, SparsitySettings, sparsify_model
from .sparsity.solve import weight_costs
from .stages import analyze_model, choose, group_summary
from .sweep import require_matplotlib
from .validate.compare import run_model

DEFAULT_ERROR = 0.05
WEIGHT_SHARES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def limits(model, config: PruneConfig, error: float = DEFAULT_ERROR) -> dict:
    """The limits of `model` at relative output error `error`, on `config.calibration` (required)."""
    if config.calibration is None:
        raise UsageError("--limits needs --calib data: the error curves are measured on it")
    if not 0.0 < error < 1.0:
        raise UsageError(f"--limit-error {error} is outside (0, 1): give a relative output error, e.g. 0.05")
    baseline = prepare(model, replace(config, scorer="obs"))
    analysis = analyze_model(baseline.loaded, config.exclude, config.hidden)
    groups = group_limits(baseline, analysis, replace(config, scorer="obs"), error)
    layers, layer_curves, grams = layer_limits(baseline, config, error)
    return {"error": error, "error_measure": "relative L2 error of the outputs (squared on the curves)",
            "groups": groups, "layers": layers, "model_channels": merged_curve(groups),
            "model_weights": weight_curve(baseline, config, grams), "layer_curves": layer_curves,
            "samples": baseline.calibration.count}


def group_limits(baseline, analysis: Analysis, config: PruneConfig, error: float) -> list[dict]:
    """Per prunable group with an obs curve: its channels, the most removable at `error`, and the curve."""
    choice = choose(baseline, analysis, config, factorizing=False)
    curves = getattr(choice.context.allocation, "curves", {})
    rows = []
    for group in analysis.prunable_groups():
        if group.index not in curves:
            continue
        curve = np.asarray(curves[group.index], dtype=np.float64)
        removable = int(np.flatnonzero(curve <= error ** 2).max())
        rows.append({"name": group_summary(group)["name"], "channels": group.channels, "removable": removable,
                     "fraction": removable / group.channels, "curve": curve.tolist()})
    return rows


def layer_limits(baseline, config: PruneConfig, error: float) -> tuple[list[dict], dict, dict]:
    """Per Conv/Gemm/MatMul layer (and FusedConv, as `--sparsity` takes them): its weights, the largest share removable at `error` (of its own output),
    and the curve (squared relative error against the share of weights removed, on a grid of 101)."""
    loaded = baseline.loaded
    shapes = infer_shapes(loaded.model, loaded.input_shapes)
    layers = [layer for layer in find_layers(import_graph(loaded.model), shapes, config.exclude, factorizing=False)
              if not layer.reason]
    grams = input_moments(loaded.model, layers, shapes, baseline.fit_data, baseline.largest_batch, config.seed,
                          SPARSITY_FEATURES)
    rows, curves = [], {}
    grid = np.linspace(0.0, 1.0, 101)
    for layer in layers:
        gram = grams.get(layer.name)
        costs = np.sort(weight_costs(layer.weight.T, gram), axis=None)
        summed = np.concatenate([[0.0], np.cumsum(costs)])
        removable = int(np.searchsorted(summed, error ** 2, side="right") - 1)
        rows.append({"name": layer.name, "op": layer.op, "weights": int(costs.size),
                     "fraction": removable / costs.size, "data_aware": gram is not None})
        curves[layer.name] = summed[np.round(grid * costs.size).astype(int)].tolist()
    return rows, curves, grams


def merged_curve(groups: list[dict]) -> list[dict]:
    """The model's channel curve: every group's error increments, cheapest first, summed; points at each
    tenth of the prunable channels."""
    steps = np.concatenate([np.diff(g["curve"]) for g in groups]) if groups else np.zeros(0)
    total = sum(g["channels"] for g in groups)
    summed = np.concatenate([[0.0], np.cumsum(np.sort(np.maximum(steps, 0.0)))])
    points = []
    for share in np.arange(1, 10) / 10:
        removed = min(int(round(share * total)), len(summed) - 1)
        points.append({"fraction": removed / max(total, 1), "rel_l2": float(np.sqrt(summed[removed]))})
    return points


def weight_curve(baseline, config: PruneConfig, grams: dict) -> list[dict]:
    """The model's weight-sparsity curve, measured: relative L2 error of the outputs at WEIGHT_SHARES."""
    loaded = baseline.loaded
    reference = baseline.reference()
    points = []
    for share in WEIGHT_SHARES:
        result = sparsify_model(loaded.model, loaded.input_shapes, baseline.fit_data,
                                SparsitySettings(share, exclude=tuple(config.exclude), seed=config.seed),
                                baseline.largest_batch, grams)
        outputs = run_model(session(result.model), baseline.evaluation, baseline.run_batch)
        worst = max((output_error(reference[n], outputs[n]) for n in reference), default=0.0)
        points.append({"fraction": result.report["achieved"], "rel_l2": worst})
    return points


def format_limits(table: dict) -> str:
    """The limits as text tables: groups, layers, and the model's two curves."""
    error = table["error"]
    lines = [f"largest share removable at output error {error:g} (relative L2; {table['samples']} calibration samples)",
             "", f"{'channel group':<44}{'channels':>9}{'removable':>10}{'share':>7}"]
    lines += [f"{g['name'][:43]:<44}{g['channels']:>9}{g['removable']:>10}{g['fraction']:>7.0%}" for g in table["groups"]]
    lines += ["", f"{'layer (weights; error of its own output)':<44}{'op':>9}{'weights':>10}{'share':>7}"]
    lines += [f"{r['name'][:43]:<44}{r['op']:>9}{r['weights']:>10}{r['fraction']:>7.0%}" for r in table["layers"]]
    lines += ["", "whole model, channels (groups' curves merged, predicted):  "
              + "  ".join(f"{p['fraction']:.0%}: {p['rel_l2']:.3f}" for p in table["model_channels"]),
              "whole model, weights (obs sparsity, measured):             "
              + "  ".join(f"{p['fraction']:.0%}: {p['rel_l2']:.3f}" for p in table["model_weights"])]
    return "\n".join(lines)


def plot_limits(table: dict) -> bytes:
    """PNG: the groups' and the model's channel curves (left), the layers' and the model's weight curves
    (right), error against the share removed, with the chosen error as a line."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for group in table["groups"]:
        curve = np.sqrt(np.asarray(group["curve"]))
        left.plot(np.arange(len(curve)) / group["channels"], curve, label=f"{group['name'][:28]} ({group['channels']})")
    left.plot([p["fraction"] for p in table["model_channels"]], [p["rel_l2"] for p in table["model_channels"]], "ko--",
              label="whole model (merged)")
    grid = np.linspace(0.0, 1.0, 101)
    for name, curve in table["layer_curves"].items():
        right.plot(grid, np.sqrt(np.asarray(curve)), linewidth=1, label=name[:32])
    right.plot([p["fraction"] for p in table["model_weights"]], [p["rel_l2"] for p in table["model_weights"]], "ko--",
               label="whole model (measured)")
    for axes, what in ((left, "channels of the group"), (right, "weights of the layer")):
        axes.axhline(table["error"], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel=f"share of the {what} removed", ylabel="relative L2 output error", xlim=(0, 1),
                 ylim=(0, max(4 * table["error"], 0.2)))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6)
    left.set_title("channel pruning")
    right.set_title("weight sparsity")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
