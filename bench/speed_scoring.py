"""Speed and memory of calibration + scoring on a ResNet-50-sized model.

onnx's light ResNet-50 topology with seeded random weights (bench/_models.py), 256 random 3x224x224
inputs, each data-informed scorer (pfp, wanda, activation) on its own process so that peak memory is
per scorer. Prints wall time, CPU time (user + system: what 2 quiet cores would need, divided by the
parallelism), peak resident memory, the model size, the calibration data size and one capture batch of
activations, and the machine's load average (this machine is shared: wall time under load says little).

    python bench/speed_scoring.py [--samples 256] [--scorers pfp,wanda,activation]
    python bench/speed_scoring.py --one pfp       (one measurement, what the table runs per row)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(scorer: str, samples: int, model_path: str, batch: int | None) -> dict:
    from onnxprune.calib import input_specs, load_calibration
    from onnxprune.calib.stats import capture_batch_size
    from onnxprune.pipeline import analyze_model, load
    from onnxprune.scoring import ScoringContext, score
    from onnxprune.scoring.consumers import find_consumers

    started = time.perf_counter()
    loaded = load(model_path)
    specs = input_specs(loaded.model, loaded.input_shapes)
    data = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
    calibration = load_calibration({specs[0].name: data}, specs)
    analysis = analyze_model(loaded)
    names = sorted({c.tensor for c in find_consumers(analysis)})
    batch_size = capture_batch_size(analysis.shapes, names, batch)
    per_sample = sum(4 * int(np.prod(analysis.shapes[n][1:])) for n in names)
    cpu0, t0 = _cpu(), time.perf_counter()
    context = ScoringContext(calibration=calibration, model=loaded.model, batch_size=batch)
    score(analysis, scorer, context)
    return {
        "scorer": scorer, "samples": samples, "score_wall_s": time.perf_counter() - t0, "score_cpu_s": _cpu() - cpu0,
        "total_wall_s": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_mb": os.path.getsize(model_path) / 1e6, "data_mb": data.nbytes / 1e6, "batch": batch_size,
        "batch_activations_mb": batch_size * per_sample / 1e6,
        "points": getattr(context.pfp, "points", None), "load": os.getloadavg()[0],
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--scorers", default="pfp,wanda,activation")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.samples, args.model, args.batch)))
        return
    from _models import random_resnet50

    with tempfile.TemporaryDirectory(prefix="onnxprune-speed-") as tmp:
        model_path = str(Path(tmp) / "resnet50_random.onnx")
        onnx.save(random_resnet50(), model_path)
        print(f"{'scorer':<11}{'samples':>8}{'score wall s':>14}{'score CPU s':>13}{'peak RSS MB':>13}"
              f"{'model MB':>10}{'data MB':>9}{'batch':>7}{'batch acts MB':>15}{'points':>8}{'load':>6}")
        for scorer in args.scorers.split(","):
            command = [sys.executable, __file__, "--one", scorer, "--samples", str(args.samples), "--model", model_path]
            if args.batch:
                command += ["--batch", str(args.batch)]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            print(f"{scorer:<11}{row['samples']:>8}{row['score_wall_s']:>14.1f}{row['score_cpu_s']:>13.1f}"
                  f"{row['peak_rss_mb']:>13.0f}{row['model_mb']:>10.0f}{row['data_mb']:>9.0f}{row['batch']:>7}"
                  f"{row['batch_activations_mb']:>15.0f}{str(row['points'] or '-'):>8}{row['load']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
