"""What a CLI run killed with SIGKILL leaves behind, before and after the next (completing) run.

    python bench/bench_kill.py                          # 6 seeded kill times and one kill in calibration
    python bench/bench_kill.py --points 3 --pythonpath /path/to/an/older/checkout

The run is the MNIST ResNet at --filters 0.5 with models/mnist_calib.npz (all 256 samples unless
--samples), --recover lstsq and --report, in a subprocess with TMPDIR pointed at a private folder. A first
complete run gives the duration D; kill times are drawn (seeded) in [0.05 D, D], and one more kill comes
when the calibration pass's probe model appears. Each point starts from a fresh folder. Per point: when
the kill came (or that the run had ended), what it left in TMPDIR and beside the output (files, bytes),
whether the output exists and the inputs are unchanged, and what is left once a normal run has completed
after it (the sweep of killed runs' folders). `tests/test_kill.py` is the fast version in the suite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_kill import Setup, kill, wait_for  # noqa: E402


def summary(left: dict[str, int], skip=()) -> str:
    files = {name: size for name, size in left.items() if name not in skip and size >= 0}
    folders = [name for name, size in left.items() if name not in skip and size < 0]
    return f"{len(files)} files {sum(files.values()):,} B, {len(folders)} dirs" if left.keys() - set(skip) else "nothing"


def point(base: Path, label: str, when, pythonpath: Path, samples: int) -> str:
    """One kill from a fresh folder; a table row."""
    setup = Setup.make(base / label)
    before = setup.inputs()
    proc = setup.start("killed", pythonpath, samples)
    started = time.perf_counter()
    if when is None:
        wait_for(proc, lambda: any((setup.root / "tmp").rglob("probe.onnx")))
    else:
        time.sleep(when)
    at = time.perf_counter() - started
    killed = kill(proc)
    tmp, out = setup.leftovers("tmp"), setup.leftovers("out")
    output = (setup.root / "out" / "killed.onnx").exists()
    nxt = setup.start("next", pythonpath, samples)
    nxt.communicate()
    after = {**{f"tmp/{k}": v for k, v in setup.leftovers("tmp").items()},
             **{f"out/{k}": v for k, v in setup.leftovers("out").items()}}
    mine = {f"out/{name}.{ext}" for name in ("next", "killed") for ext in ("onnx", "json")}
    row = (f"| {label} | {at:.2f} | {'SIGKILL' if killed else 'had ended'} | {summary(tmp)} | {summary(out)} | "
           f"{'yes' if output else 'no'} | {'yes' if setup.inputs() == before else 'NO'} | {summary(after, mine)} |")
    listing = [f"      {name}  {size:,} B" if size >= 0 else f"      {name}/" for name, size in {**tmp, **out}.items()]
    shutil.rmtree(setup.root)
    return "\n".join([row, *listing]) if listing and killed else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--pythonpath", type=Path, default=ROOT, help="the onnxprune checkout to run")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-kill-"))
    try:
        setup = Setup.make(base / "first")
        proc = setup.start("first", args.pythonpath, args.samples)
        started = time.perf_counter()
        proc.communicate()
        took = time.perf_counter() - started
        shutil.rmtree(setup.root)
        print(f"onnxprune from {args.pythonpath}; a complete run took {took:.2f} s (D)\n")
        print("| point | kill at (s) | ended by | left in TMPDIR | left beside OUT | OUT exists | inputs unchanged "
              "| left after the next run |")
        print("| --- | ---: | --- | --- | --- | --- | --- | --- |")
        times = sorted(np.random.default_rng(args.seed).uniform(0.05 * took, took, size=args.points))
        for i, when in enumerate(times):
            print(point(base, f"t{i}", when, args.pythonpath, args.samples), flush=True)
        print(point(base, "calibration", None, args.pythonpath, args.samples), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
