"""Speed and memory of calibration + scoring on a ResNet-50-sized model, on the path `onnxprune prune`
takes.

onnx's light ResNet-50 topology with seeded random weights (bench/_models.py) in a file, 256 random
3x224x224 inputs in an .npz, each data-informed scorer (pfp, wanda, activation) on its own process so
that peak memory is per scorer. The run goes through the pipeline's own functions, as `prune` calls
them: `prepare` (load, calibration data, the original's reference outputs, the model parsed again),
`analyze_model`, then `Baseline.scores` (the parsed model released while the capture pass runs, parsed
again after it). Prints wall time and CPU time of the scoring (user + system: what 2 quiet cores would
need, divided by the parallelism), peak resident memory, the model size, the calibration data size and
one capture batch of activations, and the machine's load average (this machine is shared: wall time
under load says little). Below the table, each scorer's resident memory per stage (MB at the end of the
stage / peak within it, on Linux): load, data (calibration), reference (the original's outputs, without
its parsed proto), reparse, analysis, release (the parsed proto freed before scoring), session (the
capture session built), capture+score, restore (the model parsed again after scoring).

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


def measure(scorer: str, model_path: str, data_path: str, batch: int | None) -> dict:
    from onnxprune import PruneConfig, baseline as stages_used
    from onnxprune.stages import analyze_model
    from onnxprune.calib import capture
    from onnxprune.calib.stats import capture_batch_size
    from onnxprune.scoring import ScoringContext
    from onnxprune.scoring.consumers import find_consumers

    memory = StageMemory()
    # each stage ends where the pipeline calls the function wrapped here (the same calls, only observed)
    memory.wrap(stages_used, "load", "load")
    memory.wrap(stages_used, "_calibration", "data")
    memory.wrap(stages_used.Baseline, "reference", "reference")
    memory.wrap(stages_used, "score", "capture+score", before="release")
    memory.wrap(capture, "capture_session", "session")
    started = time.perf_counter()
    config = PruneConfig(calibration=data_path, scorer=scorer, calib_batch=batch)
    baseline = stages_used.prepare(model_path, config)
    memory.end("reparse")
    analysis = analyze_model(baseline.loaded, config.exclude)
    names = sorted({c.tensor for c in find_consumers(analysis)})
    batch_size = capture_batch_size(analysis.shapes, names, batch)
    per_sample = sum(4 * int(np.prod(analysis.shapes[n][1:])) for n in names)
    memory.end("analysis")
    cpu0, t0 = _cpu(), time.perf_counter()
    context = ScoringContext(seed=config.seed, calibration=baseline.calibration, model=baseline.loaded.model,
                             batch_size=batch)
    baseline.scores(analysis, scorer, context, config)
    score_wall, score_cpu = time.perf_counter() - t0, _cpu() - cpu0
    memory.end("restore")
    return {
        "scorer": scorer, "samples": baseline.calibration.count, "score_wall_s": score_wall, "score_cpu_s": score_cpu,
        "total_wall_s": time.perf_counter() - started, "peak_rss_mb": memory.peak(),
        "model_mb": os.path.getsize(model_path) / 1e6,
        "data_mb": sum(a.nbytes for a in baseline.calibration.arrays.values()) / 1e6,
        "batch": batch_size, "batch_activations_mb": batch_size * per_sample / 1e6, "stages": memory.stages,
        "points": getattr(context.allocation, "points", None), "load": os.getloadavg()[0],
    }


def random_images(samples: int) -> np.ndarray:
    """Seeded N(0, 1) inputs, drawn a sample at a time (the same values as one float64 draw converted to
    float32, without a float64 copy of the whole set that would dominate the peak)."""
    rng = np.random.default_rng(0)
    data = np.empty((samples, 3, 224, 224), dtype=np.float32)
    for i in range(samples):
        data[i] = rng.standard_normal((3, 224, 224))
    return data


class StageMemory:
    """Resident memory (MB) at the end of each stage and its peak within it: VmRSS and VmHWM from
    /proc/self/status, the peak reset after each stage through /proc/self/clear_refs (Linux only;
    elsewhere only the whole run's peak is known)."""

    def __init__(self):
        self.stages = {}
        self._reset()

    def end(self, stage: str) -> None:
        status = _proc_status()
        if status:
            self.stages[stage] = (status["VmRSS"], status["VmHWM"])
            self._reset()

    def after(self, value, stage: str):
        self.end(stage)
        return value

    def wrap(self, owner, name: str, stage: str, before: str | None = None) -> None:
        """Replace `owner.name` by a wrapper that ends stage `before` (if given) when it is called and
        stage `stage` when it returns."""
        function = getattr(owner, name)

        def observed(*args, **kwargs):
            if before:
                self.end(before)
            return self.after(function(*args, **kwargs), stage)

        setattr(owner, name, observed)

    def peak(self) -> float:
        peaks = [peak for _, peak in self.stages.values()]
        return max(peaks) if peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def _reset() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _proc_status() -> dict[str, float]:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in lines if line.startswith(("VmRSS:", "VmHWM:")))
    return {key: int(value.split()[0]) / 1024 for key, value in fields}


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
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.data, args.batch)))
        return
    from _models import random_resnet50

    with tempfile.TemporaryDirectory(prefix="onnxprune-speed-") as tmp:
        model_path, data_path = str(Path(tmp) / "resnet50_random.onnx"), str(Path(tmp) / "calib.npz")
        model = random_resnet50()
        onnx.save(model, model_path)
        np.savez(data_path, **{model.graph.input[0].name: random_images(args.samples)})
        del model
        print(f"{'scorer':<11}{'samples':>8}{'score wall s':>14}{'score CPU s':>13}{'peak RSS MB':>13}"
              f"{'model MB':>10}{'data MB':>9}{'batch':>7}{'batch acts MB':>15}{'points':>8}{'load':>6}")
        rows = []
        for scorer in args.scorers.split(","):
            command = [sys.executable, __file__, "--one", scorer, "--model", model_path, "--data", data_path]
            if args.batch:
                command += ["--batch", str(args.batch)]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            rows.append(row)
            print(f"{scorer:<11}{row['samples']:>8}{row['score_wall_s']:>14.1f}{row['score_cpu_s']:>13.1f}"
                  f"{row['peak_rss_mb']:>13.0f}{row['model_mb']:>10.0f}{row['data_mb']:>9.0f}{row['batch']:>7}"
                  f"{row['batch_activations_mb']:>15.0f}{str(row['points'] or '-'):>8}{row['load']:>6.1f}", flush=True)
        print("\nresident MB per stage (at its end / peak within it)")
        for row in rows:
            stages = "  ".join(f"{stage} {end:.0f}/{peak:.0f}" for stage, (end, peak) in row["stages"].items())
            print(f"{row['scorer']:<11}{stages}")


if __name__ == "__main__":
    main()
