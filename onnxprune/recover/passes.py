"""Recovery passes: re-fit the layers level by level, each on inputs from the already-recovered model.

A layer's level is the number of re-fitted layers upstream of it. Two streams walk the calibration data
through the models (recover/stream.py): the pruned model's and the original's. At each level, the pruned
stream runs the nodes up to the level's layers' inputs in lockstep with the original's (their targets),
batch by batch; the new weights are written and the next level's step runs the re-fitted layers onward.
So each model runs about once in all, whatever the depth (He et al. 2017's asymmetric target: the pruned
model's inputs, the original's outputs), and errors of early layers are absorbed by the later ones
instead of piling up.

Each layer's fit only lowers its own error; whether the model's outputs got closer to the original's is
checked at the end, on the held-out calibration samples (the ones the ridge was chosen on): if they did
not, the unrecovered model is returned and the report says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from ..calib.data import CalibrationSet, can_hold_out
from ..progress import bar as progress_bar
from ..validate.compare import error_sums, relative_l2, run_model
from ..workers import numeric_pool
from .bias import BiasFit
from .layers import Initializers, find_layers
from .lstsq import ROWS_PER_FEATURE, LstsqFit
from .stream import Stream, short_lived_session

METHODS = ("none", "bias", "lstsq")
PRECOMPUTED_BYTES = 256 << 20  # the original's stream computes the targets of as many levels as fit in this at once
# (one session and one run per batch for them instead of one per level; recovery alone, best of 3-5 runs side by side:
# l1 on the rotation classifier 2.86 -> 2.71 s, the detector 4.20 -> 3.67 s, the recognizer 8.43 -> 7.47 s)
FITS = {"bias": BiasFit, "lstsq": LstsqFit}


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, calibration, method: str = "lstsq",
            output_masks: dict | None = None, original_shapes: dict | None = None, batch_size: int = 32,
            seed: int = 0, ridge: float | None = None, rows_per_feature: int = ROWS_PER_FEATURE,
            progress: bool = True, hold_out: bool = False, reference: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """A copy of `pruned` whose changed layers reproduce `original`'s outputs on `calibration` (`pruned`
    itself with method none or when that did not help), and the `recovery` report. `output_masks`: kept-channel mask of every
    tensor that lost channels; `ridge`: a fixed ridge strength for lstsq (None: chosen per layer on
    held-out calibration samples); `hold_out`: fit no layer to the held-out samples (they only choose the
    ridge and which model is kept), as when the result's fidelity is measured on them; `reference`: the original's
    outputs on the held-out samples (`held_out_samples`), when the caller has them (not computed again)."""
    report = {"method": method, "ridge": (ridge if ridge is not None else "held-out") if method == "lstsq" else None,
              "samples": calibration.part(held=False).count if hold_out else calibration.count,
              "source": calibration.source, "layers": [], "passes": 0}
    if method == "none":  # no copy, no views: each holds its weight again in float64
        return pruned, _summarise(report)
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    views, skipped = find_layers(original, model, original_shapes or {}, output_masks or {})
    report["layers"] = list(skipped)
    if not views:
        return model, _summarise(report)
    inits = Initializers(model)
    levels = sorted({v.level for v in views})
    batches = -(-calibration.count // batch_size)
    pruned_stream = Stream(model, calibration, batch_size)
    original_stream = Stream(original, calibration, batch_size)
    by_level = {level: [v for v in views if v.level == level] for level in levels}
    ahead = precompute_windows({level: _targets(members) for level, members in by_level.items()},
                               original_shapes or {}, calibration.count)
    bar = progress_bar(label="recover", total=len(levels)) if progress else None
    corrections = []
    try:
        for level, members in by_level.items():
            if level in ahead:
                original_stream.precompute(ahead[level])
            fits = [FITS[method](v, seed=[seed, level, i], batches=batches, ridge=ridge,
                                 rows_per_feature=rows_per_feature, hold_out=hold_out) for i, v in enumerate(members)]
            _write_level(inits, members, fit_level(pruned_stream, original_stream, members, fits), report, corrections)
            if bar:
                bar.update()
    finally:
        pruned_stream.close()
        original_stream.close()
        if bar:
            bar.close()
    report["passes"], report["levels"] = 2, len(levels)
    if not any(layer.get("status") == "recovered" for layer in report["layers"]):
        return model, _summarise(report)
    corrected = with_corrections(model, corrections) if corrections else None
    before, after, *rest = output_errors(original, [pruned, model, *([corrected] if corrected else [])],
                                         calibration, batch_size, reference)
    if rest:
        report["statistics_correction"] = {"output_error_held_out": _round(rest[0]), "kept": rest[0] < after,
                                           "layers": len(corrections)}
        if rest[0] < after:
            model, after = corrected, rest[0]
    report["output_error_held_out"] = {"before": _round(before), "after": _round(after)}
    report["reverted"] = not after < before
    if report["reverted"]:
        report["note"] = ("reverted: the re-fitted layers did not bring the model's outputs closer to the original's "
                          "on held-out calibration samples, so the unrecovered model is kept")
        model = pruned
    return model, _summarise(report)


def with_corrections(model: onnx.ModelProto, corrections: list) -> onnx.ModelProto:
    """A copy of the recovered `model` with the statistics-corrected weights (`Update.corrected`) of the
    given (view, update) pairs. The statistics are those of the walk, whose later layers were fitted on
    inputs without the correction: the held-out check decides on the whole model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = Initializers(copy)
    nodes = {node.output[0]: node for node in copy.graph.node}
    for view, update in corrections:
        weight, bias = update.corrected
        slot = view.bias
        if slot.additive:  # the Add's constant already holds the fitted offset: add the difference
            bias = bias - update.bias
        moved = dataclasses.replace(view, node=nodes[view.output],
                                    bias=dataclasses.replace(slot, node=nodes[slot.node.output[0]]))
        moved.write(inits, weight, bias)
    return copy


def held_out_samples(calibration: CalibrationSet, fixed_batch: int | None = None) -> CalibrationSet:
    """The calibration samples fits hold out; all of them when none can be held out (`can_hold_out`: too few, or
    a fixed batch above 1 that needs whole batches, which the held-out ones need not fill)."""
    return calibration.part(held=True) if can_hold_out(calibration, fixed_batch) else calibration


def output_errors(original: onnx.ModelProto, candidates: list[onnx.ModelProto], calibration: CalibrationSet,
                  batch_size: int, reference: dict | None = None) -> list[float]:
    """Per candidate: the largest error over the original's outputs on the held-out calibration samples:
    relative L2 for floating-point outputs, the fraction of differing values for others (class ids).
    `reference`: the original's outputs on those samples, if known (else the original runs)."""
    samples = held_out_samples(calibration)
    if reference is None:
        sess = short_lived_session(original)
        fixed = [i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)]
        samples = held_out_samples(calibration, max(fixed, default=None))
        reference = run_model(sess, samples, batch_size)
    errors = []
    for candidate in candidates:
        outputs = run_model(short_lived_session(candidate), samples, batch_size)
        errors.append(max((output_error(reference[n], outputs[n]) for n in reference), default=0.0))
    return errors


def output_error(reference: np.ndarray, result: np.ndarray) -> float:
    """Relative L2 error of a floating-point output; the fraction of differing values of another."""
    if not np.issubdtype(reference.dtype, np.floating):
        return float(np.mean(reference != result)) if reference.size else 0.0
    return relative_l2(error_sums(reference, result))


def _write_level(inits: Initializers, members, updates, report: dict, corrections: list) -> None:
    """Write one level's re-fitted weights and report its layers."""
    for view, update in zip(members, updates):
        if update.weight is not None or update.bias is not None:
            view.write(inits, update.weight, update.bias)
        if update.corrected is not None:
            corrections.append((view, update))
        report["layers"].append(_entry(view, update))


def fit_level(pruned: Stream, original: Stream, members, fits) -> list:
    """One level's updates: its fits fed (`accumulate`) in the numeric pool, then solved side by side
    there, or a level's one fit after it, its BLAS on every core (on a quiet machine ResNet-50's widest
    layers, one per level, solved 20% slower on one BLAS thread)."""
    with numeric_pool() as pool:
        accumulate(pruned, original, members, fits, pool)
        if len(fits) > 1:
            return list(pool.map(lambda fit: fit.finish(), fits))
    return [fits[0].finish()]


def accumulate(pruned: Stream, original: Stream, members, fits, pool) -> None:
    """Feed one level's fits batch by batch: the layers' inputs from the pruned stream, their targets from
    the original's stream. The layers themselves run once, with their re-fitted weights at the next level,
    unless a fit needs their outputs with the current weights for every batch (`needs_outputs`: then they
    run now too); least squares' self-check gets its batch's from a session of the layers alone.
    The fits take a batch in `pool`, side by side, while the streams run the next one; a level's one layer
    hands the pool its products in parts (its x^T x in two blocks: ResNet-50's levels have one layer each); a fit
    takes its batches in order (its sums are the same to the last bit)."""
    outputs = [v.output for v, fit in zip(members, fits) if fit.needs_outputs and not v.product_of]
    own = list(dict.fromkeys([*(v.input for v in members), *outputs]))
    targets = _targets(members)
    layers = frozenset(pruned.producer[name] for name in outputs)
    parts_pool = pool if len(members) == 1 else None  # several layers keep the workers busy already, and each
    # queued part holds its layer's centred batch copy: with 16 layers the peak was 4x the old one
    running = []
    for acts, refs in zip(pruned.run(own, provisional=layers), original.run(targets)):
        _wait(running)
        running = [pool.submit(_add, parts_pool, view, fit, acts, refs) for view, fit in zip(members, fits)]
    _wait(running)
    _self_checks(pruned, [(view, fit) for view, fit in zip(members, fits) if fit.to_check is not None])


def _self_checks(pruned: Stream, waiting) -> None:
    """Run the (view, fit) pairs' layers alone, with their current weights, up to the last batch a fit's check
    waits for (usually the first), and hand each fit its layer's output on its batch."""
    if not waiting:
        return
    due = [(fit.to_check[0], view, fit) for view, fit in waiting]
    last = max(batch for batch, _, _ in due)
    for batch, outputs in enumerate(pruned.evaluate([view.output for view, _ in waiting], [])({})):
        for view, fit in ((view, fit) for at, view, fit in due if at == batch):
            fit.self_check(outputs[view.output])
        if batch == last:
            break


def _targets(members) -> list[str]:
    """The original's tensors a level's layers are fitted to."""
    return list(dict.fromkeys(v.product_of[0] if v.product_of else v.output for v in members))


def precompute_windows(targets: dict[int, list[str]], shapes: dict, samples: int) -> dict[int, list[str]]:
    """Runs of consecutive levels whose targets (`targets[level]`, levels in order) take at most PRECOMPUTED_BYTES
    for all samples, by their shapes: {a run's first level: its levels' targets}, which the original's stream
    computes in one go at that level. A level alone, or whose targets' shapes are not all known, is left to its
    own step."""
    windows, run, size = [], [], 0
    for level, names in targets.items():
        need = _bytes_per_sample(shapes, names)
        need = need * samples if need is not None else PRECOMPUTED_BYTES + 1
        if run and size + need > PRECOMPUTED_BYTES:
            windows.append(run)
            run, size = [], 0
        run.append(level)
        size += need
    windows.append(run)
    return {run[0]: [name for level in run for name in targets[level]] for run in windows if len(run) > 1}


def _bytes_per_sample(shapes: dict, names: list[str]) -> int | None:
    """Bytes of one sample of the float32 tensors `names`, or None when a dim is unknown. Their whole shapes
    count, the first axis too: it is the analysed shapes' batch (1, or a model's fixed batch: then an
    overestimate), or a recurrent layer's steps ([steps, batch, ...])."""
    dims = [shapes.get(name) for name in names]
    if not all(d and all(isinstance(n, int) and n > 0 for n in d) for d in dims):
        return None
    return sum(4 * int(np.prod(d, dtype=np.int64)) for d in dims)


def _add(pool, view, fit, acts: dict, refs: dict) -> list:
    """Feed `fit` one batch; its remaining parts (`add_parts`) go to `pool` (their futures), or with no pool
    are run here."""
    if view.product_of:  # the output is not the product: both products computed from the inputs
        parts = fit.add_parts(acts[view.input], *view.products(acts[view.input], refs[view.product_of[0]]))
    else:
        parts = fit.add_parts(acts[view.input], acts.get(view.output), refs[view.output])
    if pool is None:
        for part in parts:
            part()
        return []
    return [pool.submit(part) for part in parts]


def _wait(jobs) -> None:
    """Wait for `_add` jobs and the parts they handed the pool."""
    for job in jobs:
        for part in job.result():
            part.result()


def _entry(view, update) -> dict:
    entry = {"name": view.name, "op": view.op, "level": view.level,
             "error_before": _round(update.error_before), "error_after": _round(update.error_after)}
    if update.ridge is not None:
        entry["ridge"] = update.ridge
    if update.held_out is not None:
        entry["held_out_before"], entry["held_out_after"] = (_round(v) for v in update.held_out)
    if update.note.startswith("skipped"):
        entry.update(status="skipped", reason=update.note.removeprefix("skipped: "))
    elif update.note:
        entry.update(status="kept", reason=update.note.removeprefix("kept: "))
    else:
        entry["status"] = "recovered"
    return entry


def _round(value: float):
    return None if not np.isfinite(value) else round(float(value), 6)


def _summarise(report: dict) -> dict:
    layers = report["layers"]
    done = [] if report.get("reverted") else [l for l in layers if l.get("status") == "recovered"]
    measured = [l for l in layers if l.get("error_before") is not None]
    report.update({
        "recovered": len(done),
        "skipped": sum(1 for l in layers if l.get("status") == "skipped"),
        "mean_error_before": _round(np.mean([l["error_before"] for l in measured])) if measured else None,
        "mean_error_after": _round(np.mean([l["error_after"] for l in measured])) if measured else None,
    })
    return report
