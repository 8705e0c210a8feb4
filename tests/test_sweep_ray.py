"""`onnxprune sweep --ray`: the settings as tasks on a local Ray instance with 2 workers, started here.

Needs the extra (pip install 'onnxprune[ray]'); .ci/run installs it and runs this file after the default
suite, which skips it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxprune.sweep as sweep_module
from onnxprune import PruneConfig, runtime
from onnxprune.baseline import prepare
from onnxprune.cluster import ray_map, worker_slots
from onnxprune.errors import UsageError
from onnxprune.sweep import run_setting, settings_grid, sweep
from onnxprune.validate.latency import LatencyConfig

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'onnxprune[ray]'")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
TIMED = ("latency_ms", "speedup")  # measured, so they differ between any two runs


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs (2 workers), its address for other processes."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """40 labelled MNIST samples: 8 held out (every fifth), 32 for the fits."""
    path = tmp_path_factory.mktemp("ray") / "calib40.npz"
    with np.load(CALIB) as data:
        np.savez(path, input=data["input"][:40], labels=data["labels"][:40])
    return path


def untimed(table: dict) -> dict:
    """The table as JSON would hold it, without the timing-dependent fields."""
    table = json.loads(json.dumps(table))
    for row in table["settings"]:
        for key in TIMED:
            row.pop(key, None)
    return table


def test_a_sweep_on_ray_is_the_local_sweep(cluster, calib, monkeypatch):
    """Same table, rows and sensitivity curves (in the settings' order) from 2 Ray workers as from the
    local loop, for the same seed."""
    config = PruneConfig(calibration=str(calib), seed=3)
    settings = settings_grid([0.5, 0.2])  # not sorted: the rows keep the settings' order
    local = sweep(str(MODEL), config, settings)
    monkeypatch.setattr(sweep_module, "prune", None)  # from here on, only the workers' processes can prune
    on_ray = sweep(str(MODEL), config, settings, ray="auto")
    assert [r["filters"] for r in on_ray["settings"]] == [0.5, 0.2]
    assert on_ray["sensitivity"] and on_ray["metric"] == "accuracy"
    assert untimed(on_ray) == untimed(local)


def test_the_cli_on_a_cluster_by_address_with_latency(cluster, calib, tmp_path):
    """Another process joins the cluster by its address. With --latency each worker holds a whole machine
    (here: one worker of 2 CPUs), so no other setting runs beside a measurement; all but the timings
    equal the local sweep's."""
    whole_machine, = worker_slots(ray, whole_machines=True)
    assert whole_machine["num_cpus"] == 2
    assert worker_slots(ray, whole_machines=False) == [{"num_cpus": 1}] * 2
    args = [MODEL, "--calib", calib, "--filters", "0.2,0.5", "--no-sensitivity", "--latency", "--latency-runs", 2]
    table = tmp_path / "ray.json"
    done = subprocess.run([sys.executable, "-c", "from onnxprune.cli import main; main()", "sweep", *map(str, args),
                           "--ray", cluster, "--report", str(table), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    on_ray = json.loads(table.read_text())
    assert all(row["speedup"] > 0 and row["latency_ms"] > 0 for row in on_ray["settings"])
    local = sweep(MODEL, PruneConfig(calibration=str(calib), latency=LatencyConfig(runs=2)), settings_grid([0.2, 0.5]),
                  sensitivity=False)
    assert untimed(on_ray) == untimed(local)


def test_an_error_on_a_worker_is_raised_as_itself(cluster, calib):
    shared = (prepare(str(MODEL), PruneConfig()).portable(), PruneConfig(), False)
    with pytest.raises(UsageError, match="--filters"):
        ray_map(run_setting, shared, [{"filters": 0.5}, {"filters": 1.5}])


def test_each_worker_runs_onnxruntime_on_its_share_of_the_cores(cluster):
    assert ray_map(lambda shared, item: runtime.intra_op_threads, None, [1, 2]) == [1, 1]
