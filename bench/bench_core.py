"""End-to-end benchmark of the core job: load -> analyze -> prune -> validate -> save.

    python bench/bench_core.py                 # ResNet-50 (random weights) + every real model
    python bench/bench_core.py --models resnet50_random mnist_resnet

Each model runs in its own process so peak memory is that run's alone. Prints, per model: wall time
of the whole job, peak RSS above the interpreter's RSS after imports, that as a multiple of the model's
file size, and the coverage. Target (issue 2): ResNet-50 at --filters 0.5 in <= 5 s and <= 3x its size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, VmHWM does not inherit the
    parent's peak across fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_one(path: str, shapes: dict, filters: float, out: str) -> dict:
    """In a child process: the whole job as the CLI runs it, timed, with memory measured."""
    import onnxprune  # noqa: F401  (imports are not part of the job's memory)
    from onnxprune.io import file_size, save_model
    from onnxprune import PruneConfig, prune

    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    result = prune(path, PruneConfig(filters=filters, input_shapes=shapes))
    save_model(result.model, out)
    wall = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"wall_s": wall, "peak_mb": peak - baseline, "size_mb": file_size(path) / 2**20,
            "coverage": result.report["coverage"], "timings": result.report["timings_s"],
            "macs_kept": result.report["after"]["macs"] / result.report["before"]["macs"]}


def resnet50_random(directory: Path) -> Path:
    """onnx's light ResNet-50 topology with seeded random weights (bench/_models.py), batch fixed at 1."""
    import onnx

    from _models import random_resnet50

    path = directory / "resnet50_random.onnx"
    onnx.save(random_resnet50(batch=1), str(path))
    return path


def model_list(directory: Path) -> dict[str, tuple[Path, dict]]:
    import real_models

    models = {"resnet50_random": (resnet50_random(directory), {}),
              "mnist_resnet": (ROOT / "models" / "mnist_resnet.onnx", {})}
    for name in real_models.REGISTRY:
        try:
            models[name] = (real_models.fetch(name), real_models.input_shapes(name))
        except real_models.ModelUnavailable as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="subset of model names")
    parser.add_argument("--filters", type=float, default=0.5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, shapes, out = json.loads(args.child)
        print(json.dumps(run_one(path, shapes, args.filters, out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models = model_list(Path(tmp))
        names = args.models or list(models)
        print(f"{'model':<20}{'size MB':>9}{'wall s':>9}{'peak MB':>9}{'peak/size':>10}{'coverage':>10}{'MACs kept':>10}  stages (s)")
        for name in names:
            path, shapes = models[name]
            child = json.dumps([str(path), shapes, str(Path(tmp) / "out.onnx")])
            proc = subprocess.run([sys.executable, __file__, "--child", child, "--filters", str(args.filters)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            stages = " ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
            print(f"{name:<20}{r['size_mb']:>9.1f}{r['wall_s']:>9.2f}{r['peak_mb']:>9.0f}{r['peak_mb'] / r['size_mb']:>10.1f}"
                  f"{r['coverage']:>10.1%}{r['macs_kept']:>10.1%}  {stages}", flush=True)


if __name__ == "__main__":
    main()
