"""Sweeps: prune one model at many settings and tabulate what each costs and keeps.

The model is loaded, the calibration and evaluation data read and the original's outputs computed once
(`baseline.prepare`); every setting is pruned against that `Baseline`. For each setting the table has
fidelity (and accuracy with labels), MACs, params, file size and, with latency on, the measured speedup.
Per-layer sensitivity prunes each channel group alone, exactly as that setting prunes it (the setting's
plan restricted to the one group), and records the same measures.

`run_setting` is everything one setting computes, from the baseline, the config and the setting alone:
the local sweep calls it in a loop, `--ray` as one Ray task per setting (`cluster.ray_map`, which ships
the baseline's model and data once), and `_table` makes the same table of either's results.

Settings are PruneConfig overrides: `{"filters": 0.3}`, or `{"filters": 0.3, "rank": 0.5}` with low-rank
factorization; `settings_grid` is the one place to extend.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path

from .baseline import prepare
from .cluster import ray_map
from .config import PruneConfig, check_filters, latency_wanted
from .errors import NothingToPrune, UsageError
from .io import EXTERNAL_DATA_THRESHOLD
from .pipeline import prune
from .progress import bar
from .plan import Plan
from .report import measured_on, report_header
from .validate.compare import worst_channel
from .workdir import run_folder, temp_folder

log = logging.getLogger(__name__)


def parse_values(text: str, option: str) -> list:
    """'0.1,0.2,auto' -> [0.1, 0.2, 'auto'] (numbers as floats, words kept)."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(float(item))
        except ValueError:
            values.append(item)
    if not values:
        raise UsageError(f"{option} got no values: give a comma-separated list, e.g. 0.1,0.3,0.5")
    return values


DEFAULT_FILTERS = [0.1, 0.2, 0.3, 0.4, 0.5]


def settings_grid(filters: list | None, ranks: list | None = None) -> list[dict]:
    """PruneConfig overrides for every setting: each filters value, crossed with each rank if given.
    Without filters values: the default list, or channels left whole when ranks are swept."""
    if filters is None:
        filters = [0.0] if ranks else DEFAULT_FILTERS
    for value in filters:
        if not isinstance(value, float):
            raise UsageError(f"--filters value {value!r} is not a number: give fractions of channels to remove")
        check_filters(value)
    if not ranks:
        return [{"filters": f} for f in filters]
    return [{"filters": f, "rank": r} for f in filters for r in ranks]


def sweep(model, config: PruneConfig, settings: list[dict], sensitivity: bool = True, ray: str | None = None) -> dict:
    """Prune `model` at every setting (overrides of `config`); the sweep table as plain data. With `ray`
    (a cluster's address, or 'auto'), the settings run as tasks on a Ray cluster (`cluster.ray_map`). A
    latency model (--round-to auto) is measured once and its fits reused by every setting: from
    `config.latency_cache`, else a file that lasts the sweep."""
    if latency_wanted(config) and config.latency_cache is None:
        with temp_folder("sweep-") as directory:
            return sweep(model, replace(config, latency_cache=Path(directory) / "sweep.latency.json"), settings,
                         sensitivity, ray)
    checks_off = {"gates": None, "mobile": False, "plan": None}
    config = replace(config, **checks_off)
    baseline = prepare(model, replace(config, **settings[0]))  # a swept --rank fits the data too
    runs = bar(label="sweep", total=len(settings))
    if ray is None:
        outcomes = []
        for setting in settings:
            outcomes.append(run_setting((baseline, config, sensitivity), setting, runs))
    else:
        if baseline.loaded.size_bytes >= EXTERNAL_DATA_THRESHOLD:
            raise UsageError(f"--ray ships the model as one protobuf message, which cannot reach 2 GB (this one is "
                             f"{baseline.loaded.size_bytes / 1e9:.1f} GB): sweep it without --ray")
        shared = (baseline.portable(), _for_workers(config, baseline), sensitivity)
        outcomes = ray_map(run_setting, shared, settings, ray, whole_machines=config.latency is not None,
                           done=runs.update)
    runs.close()
    return _table(model, config, outcomes)


def run_setting(shared: tuple, setting: dict, runs=None) -> dict:
    """One setting's row and its groups' sensitivity points, from `shared` = (baseline, config,
    sensitivity): what a sweep computes per setting, on this machine or on a Ray worker alike. `runs`:
    a progress bar to count the setting and its sensitivity runs on."""
    baseline, config, sensitivity = shared
    config = _cache_on_this_machine(config)
    runs = runs if runs is not None else bar(label="setting", total=1)  # on a Ray worker: never shown
    try:
        result = prune(baseline, replace(config, **setting))
    except NothingToPrune as exc:  # e.g. a rank at which no layer gets cheaper: a row saying so
        runs.update()
        return {"row": {**setting, "error": str(exc)}, "error": exc, "report": None, "points": []}
    points = []
    if sensitivity:
        groups = _pruned_groups(result.plan)
        runs.total += len(groups)
        alone = replace(config, **setting, latency=None, round_to=None)  # a plan: no rounding, no timing
        for gp in groups:
            single = prune(baseline, replace(alone, plan=Plan([gp])))
            points.append((_curve(gp, result.report), {**setting, "channels_after": len(gp.keep),
                                                       **measures(single.report)}))
            runs.update()
    runs.update()
    return {"row": {**setting, **measures(result.report)}, "error": None, "report": result.report, "points": points}


def _for_workers(config: PruneConfig, baseline) -> PruneConfig:
    """`config` for workers that get the data in `baseline`: its data options are file paths they may not
    have, or readers that cannot be shipped (only whether calibration data was given still counts). The
    latency cache is named by absolute path: a worker's working folder is not the driver's."""
    cache = Path(config.latency_cache).absolute() if config.latency_cache is not None else None
    return replace(config, calibration=baseline.calibration if config.calibration is not None else None,
                   evaluation=None, labels=None, latency_cache=cache)


def _cache_on_this_machine(config: PruneConfig) -> PruneConfig:
    """On a Ray worker of another machine the latency cache's folder (the driver's) does not exist: the
    worker keeps its fits in its own run folder instead (they are per machine anyway: `cache_key`)."""
    cache = config.latency_cache
    if cache is None or Path(cache).parent.is_dir():
        return config
    return replace(config, latency_cache=run_folder() / Path(cache).name)


def _table(model, config: PruneConfig, outcomes: list[dict]) -> dict:
    """The sweep table from the settings' outcomes (`run_setting`), in the settings' order."""
    reports = [o["report"] for o in outcomes if o["report"] is not None]
    if not reports:
        raise outcomes[0]["error"]
    first = reports[0]
    curves = {}
    for outcome in outcomes:
        for curve, point in outcome["points"]:
            curves.setdefault(tuple(curve["sources"]), curve)["points"].append(point)
    order = {tuple(g["sources"]): i for i, g in enumerate(first["groups"])}
    return {
        **report_header(),
        "kind": "sweep",
        "model": str(model),
        "metric": _metric(first),
        "baseline": {**first["before"], "accuracy": first["accuracy"]["before"] if first.get("accuracy") else None},
        "data": first["data"],
        "settings": [o["row"] for o in outcomes],
        "sensitivity": sorted(curves.values(), key=lambda c: order.get(tuple(c["sources"]), len(order))),
        "config": {"scorer": config.scorer, "global": config.global_ranking, "round_to": config.round_to,
                   "exclude": list(config.exclude), "seed": config.seed},
    }


def _pruned_groups(plan: Plan) -> list:
    return [gp for gp in plan.groups if len(gp.keep) < gp.channels]


def _curve(gp, report: dict) -> dict:
    names = {tuple(g["sources"]): g["name"] for g in report["groups"]}
    return {"group": names.get(tuple(gp.sources), gp.sources[0]), "sources": gp.sources, "channels": gp.channels,
            "points": []}


def measures(report: dict) -> dict:
    """The sweep table's columns, from one prune report."""
    before, after, fid = report["before"], report["after"], report["fidelity"]
    accuracy, latency, worst = report.get("accuracy"), report.get("latency"), worst_channel(fid)
    return {
        "params": after["params"],
        "macs": after["macs"],
        "size_bytes": after["size_bytes"],
        "params_kept": after["params"] / before["params"] if before["params"] else 1.0,
        "macs_kept": after["macs"] / before["macs"] if before["macs"] else 1.0,
        "cosine": min(f["cosine"] for f in fid["per_output"].values()),
        "rel_l2": max(f["rel_l2"] for f in fid["per_output"].values()),
        "top1_agreement": fid.get("top1_agreement"),
        "worst_channel_error": worst[1]["rel_l2"] if worst else None,
        "accuracy": accuracy["after"] if accuracy else None,
        "accuracy_drop": accuracy["drop"] if accuracy else None,
        "latency_ms": latency["after"]["median_ms"] if latency else None,
        "speedup": latency["speedup"] if latency else None,
    }


def _metric(report: dict) -> str:
    """What the plot shows: accuracy with labels, else top-1 agreement for classifiers, else cosine."""
    if report.get("accuracy"):
        return "accuracy"
    return "top1_agreement" if report["fidelity"].get("top1_agreement") is not None else "cosine"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("the sweep plot needs matplotlib: pip install 'onnxprune[plot]' (or leave out --plot)") from None


def plot_png(table: dict) -> bytes:
    """Two panels: the metric and MACs/params kept against filters removed; per-group sensitivity."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = table["metric"]
    figure = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for label, rows in _series([r for r in table["settings"] if "error" not in r]).items():
        left.plot([r["macs_kept"] for r in rows], [r[metric] for r in rows], "o-", label=f"{metric}{label}")
        for r in rows:
            left.annotate(_setting_label(r), (r["macs_kept"], r[metric]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    left.set(xlabel="fraction of the original MACs kept", ylabel=metric, title="settings", ylim=(0, 1.05))
    left.grid(alpha=0.3)
    _plot_worst_channel(left, [r for r in table["settings"] if r.get("worst_channel_error") is not None])
    left.legend(fontsize=8)
    for curve in table["sensitivity"]:
        points = [p for p in curve["points"] if "rank" not in p or p["rank"] == curve["points"][0].get("rank")]
        right.plot([1 - p["channels_after"] / curve["channels"] for p in points], [p[metric] for p in points], "o-",
                   label=f"{curve['group'][:28]} ({curve['channels']})")
    original = table["baseline"]["accuracy"] if metric == "accuracy" else 1.0
    for axes in (left, right):
        axes.axhline(original, color="grey", linestyle=":", linewidth=1)
    right.set(xlabel="fraction of the group's channels removed", ylabel=metric,
              title="per-group sensitivity (each group pruned alone)", ylim=(0, 1.05))
    right.grid(alpha=0.3)
    if table["sensitivity"]:
        right.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_worst_channel(axes, rows: list[dict]) -> None:
    """The worst channel's error against MACs kept, dashed, on its own axis at the right of `axes`."""
    if not rows:
        return
    errors = axes.twinx()
    errors.set_prop_cycle(color=["tab:red", "tab:purple", "tab:brown", "tab:pink"])  # apart from the metric's
    for label, series in _series(rows).items():
        errors.plot([r["macs_kept"] for r in series], [r["worst_channel_error"] for r in series], "s--",
                    label=f"worst channel rel. error{label}")
    top = max(r["worst_channel_error"] for r in rows)
    errors.set(ylabel="worst channel rel. L2 error (dashed)", ylim=(0, max(1.05, 1.05 * top)))
    errors.legend(fontsize=8, loc="lower right")


def _setting_label(row: dict) -> str:
    return f"f{row['filters']:g}" + (f" r{row['rank']}" if "rank" in row else "")


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows split by rank setting (one line each); a single unnamed series without ranks."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        label = f" (rank {row['rank']})" if "rank" in row else ""
        series.setdefault(label, []).append(row)
    return series


def format_table(table: dict) -> str:
    """The terminal view: one line per setting, then sensitivity per group."""
    metric = table["metric"]
    has_rank = any("rank" in r for r in table["settings"])
    header = f"{'filters':>8}" + (f"{'rank':>7}" if has_rank else "") + \
        f"{'MACs kept':>11}{'params kept':>13}{'cosine':>9}{'worst ch.':>10}{'top-1':>8}{'accuracy':>10}{'latency ms':>12}" \
        f"{'speedup':>9}"
    lines = [f"sweep of {table['model']}: {len(table['settings'])} settings, measured on {measured_on(table['data'])}",
             header]
    for r in table["settings"]:
        setting = f"{r['filters']:>8.2f}" + (f"{str(r.get('rank', '-')):>7}" if has_rank else "")
        if "error" in r:
            lines.append(f"{setting}  not pruned: {r['error']}")
            continue
        lines.append(setting + f"{r['macs_kept']:>11.1%}{r['params_kept']:>13.1%}{r['cosine']:>9.4f}"
                     + _opt(r["worst_channel_error"], 10, ".4f") + _opt(r["top1_agreement"], 8, ".1%")
                     + _opt(r["accuracy"], 10, ".2%")
                     + _opt(r["latency_ms"], 12, ".3f") + _opt(r["speedup"], 9, ".2f"))
    if table["sensitivity"]:
        lines += ["", f"sensitivity ({metric} with only this group pruned, at each setting):"]
        for curve in table["sensitivity"]:
            values = "  ".join(f"{p['filters']:.2f}: {p[metric]:.4f}" for p in curve["points"])
            lines.append(f"  {curve['group'][:40]:<40} ({curve['channels']:>4} ch)  {values}")
    return "\n".join(lines)


def _opt(value, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"
