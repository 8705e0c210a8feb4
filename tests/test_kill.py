"""SIGKILL at seeded points of a CLI run with calibration and recovery: no output (or a whole one, when the kill
came after it was published), the inputs unchanged, and nothing of the killed runs left once a later run has
completed (it sweeps what they left).

The CLI runs in a subprocess with TMPDIR pointed at a private folder, so whatever a run leaves is counted.
The kill times are drawn between the moment the first run made its run folder and its end; one more kill
comes when the calibration pass's probe model appears. `bench/bench_kill.py` runs more points and prints
what each kill left before the sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
MODEL, CALIB = ROOT / "models" / "mnist_resnet.onnx", ROOT / "models" / "mnist_calib.npz"
CLI = "import sys; from onnxprune.cli import main; sys.exit(main())"
POLL_S = 0.002
SAMPLES = 64  # of the 256: the run takes about half as long, every stage still runs


@dataclass
class Setup:
    """A private folder: in/ (copies of the model and data), out/, tmp/ (the runs' TMPDIR)."""

    root: Path

    @classmethod
    def make(cls, root: Path) -> "Setup":
        for name in ("in", "out", "tmp"):
            (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(MODEL, root / "in" / MODEL.name)
        shutil.copy(CALIB, root / "in" / CALIB.name)
        return cls(root)

    def start(self, name: str, pythonpath: Path = ROOT, samples: int = SAMPLES) -> subprocess.Popen:
        """A run writing out/NAME.onnx and out/NAME.json, on the first `samples` calibration samples."""
        args = [str(self.root / "in" / MODEL.name), str(self.root / "out" / f"{name}.onnx"), "--filters", "0.5",
                "--calib", str(self.root / "in" / CALIB.name), "--calib-samples", str(samples), "--recover", "lstsq",
                "--report", str(self.root / "out" / f"{name}.json"), "-q"]
        env = dict(os.environ, TMPDIR=str(self.root / "tmp"), PYTHONPATH=str(pythonpath))
        return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, cwd=self.root,  # not the checkout's
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def inputs(self) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (self.root / "in").iterdir()}

    def leftovers(self, folder: str) -> dict[str, int]:
        """Files and folders in tmp/ or out/ (relative path -> bytes, -1 for a folder), but onnxruntime's
        `.ses` (an id it keeps in $TMPDIR once imported)."""
        base = self.root / folder
        return {str(p.relative_to(base)): (p.stat().st_size if p.is_file() else -1)
                for p in sorted(base.rglob("*")) if p.name != ".ses"}


def wait_for(proc: subprocess.Popen, found) -> float:
    """Poll until `found()` or the end of `proc`; the seconds waited."""
    started = time.perf_counter()
    while proc.poll() is None and not _looked(found):
        time.sleep(POLL_S)
    return time.perf_counter() - started


def _looked(found) -> bool:
    """`found()`, False when a folder it walks was removed by the run meanwhile (a race, not a finding)."""
    try:
        return found()
    except FileNotFoundError:
        return False


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc` unless it has ended; whether the kill ended it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode == -signal.SIGKILL


def first_run(setup: Setup) -> tuple[float, float]:
    """A complete run: (seconds until its run folder appeared, seconds until its output appeared). Kills
    are timed inside that span: a kill after the output is complete may rightly leave it there."""
    proc = setup.start("first")
    started = time.perf_counter()
    wait_for(proc, lambda: any((setup.root / "tmp").glob("onnxprune-run-*")))
    made = time.perf_counter() - started
    wait_for(proc, lambda: (setup.root / "out" / "first.onnx").exists())
    written = time.perf_counter() - started
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return made, written


def kill_after(setup: Setup, name: str, seconds: float) -> bool:
    proc = setup.start(name)
    time.sleep(seconds)
    return kill(proc)


def kill_in_calibration(setup: Setup, name: str) -> bool:
    proc = setup.start(name)
    wait_for(proc, lambda: any((setup.root / "tmp").rglob("probe.onnx")))
    return kill(proc)


def complete_outputs(setup: Setup, name: str) -> set[str]:
    """The files a killed run published (a kill can land after the model was published and before the
    process ended, when a run is quicker than the first); each must be whole: the checker passes on the
    model, the report parses."""
    out = setup.root / "out"
    published = {p.name for p in out.glob(f"{name}.*")}
    assert published <= {f"{name}.onnx", f"{name}.json"}, published
    if f"{name}.onnx" in published:
        onnx.checker.check_model(str(out / f"{name}.onnx"), full_check=True)
    if f"{name}.json" in published:
        assert f"{name}.onnx" in published, "the report was published before the model"
        json.loads((out / f"{name}.json").read_text())
    return published


def test_killed_runs_leave_no_output_and_the_next_run_removes_their_temporary_files(tmp_path):
    setup = Setup.make(tmp_path)
    before = setup.inputs()
    made, took = first_run(setup)
    assert setup.leftovers("tmp") == {}
    rng = np.random.default_rng(17)
    points = [(f"at{i}", lambda name, t=t: kill_after(setup, name, t))
              for i, t in enumerate(sorted(rng.uniform(made, took, size=3)))]
    points.append(("calibration", lambda name: kill_in_calibration(setup, name)))
    written = {f"{name}.{ext}" for name in ("first", "last") for ext in ("onnx", "json")}
    killed_before_output = []
    for name, run in points:
        killed = run(name)
        published = complete_outputs(setup, name)
        written |= published
        if killed and not published:
            killed_before_output.append(name)
        assert setup.inputs() == before
    assert "calibration" in killed_before_output and len(killed_before_output) >= 2, \
        f"only {killed_before_output} of the runs were killed before their output appeared"
    last = setup.start("last")
    _, err = last.communicate()
    assert last.returncode == 0, err
    assert setup.leftovers("tmp") == {}
    assert set(setup.leftovers("out")) == written
    assert setup.inputs() == before


def test_a_terminated_run_removes_its_own_temporary_files_and_writes_nothing(tmp_path):
    """SIGTERM (a CI job cancelled, `timeout`) unwinds the run: exit 143, one line, no run folder left
    without waiting for a later run to sweep it, no output, the inputs unchanged."""
    setup = Setup.make(tmp_path)
    before = setup.inputs()
    proc = setup.start("terminated")
    wait_for(proc, lambda: any((setup.root / "tmp").rglob("probe.onnx")))  # inside the calibration pass
    assert proc.poll() is None, "the run ended before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["error: terminated (SIGTERM): nothing written, temporary files removed"]
    assert setup.leftovers("tmp") == {} and setup.leftovers("out") == {} and setup.inputs() == before
