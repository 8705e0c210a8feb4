"""Fingerprints of what `onnxprune prune` writes, to check that a refactoring changed no behaviour.

For every test builder, the shipped MNIST model and the cached public real models, runs the CLI at a few
settings and prints one line per run: SHA-256 prefixes of the pruned model, the plan, the JSON report
(without `timings_s`) and the terminal text (without wall times), plus the exit code. Run it on two
commits and diff the outputs:

    python bench/fingerprint.py > before.txt      # on the old commit
    python bench/fingerprint.py > after.txt       # on the new one
    diff before.txt after.txt                     # no output: byte-identical behaviour

`--quick` leaves out the real models; `--only SUBSTRING` runs matching rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.cli import main as cli  # noqa: E402
from tests import models as builders  # noqa: E402
from tests.real_models import REGISTRY, cache_dir, fetch, input_shapes, random_feed  # noqa: E402

BUILDER_SETTINGS = [["--filters", "0.5"], ["--filters", "0.4", "--scorer", "pfp", "--calib", "{calib}"],
                    ["--rank", "0.5"]]
MNIST_SETTINGS = [
    [],
    ["--target-macs", "0.5"],
    ["--target-macs", "0.6", "--scorer", "wanda", "--recover", "bias"],
    ["--filters", "0.3", "--global", "--scorer", "l1", "--recover", "none"],
    ["--filters", "0.3", "--pfp-mode", "sample"],
    ["--rank", "auto", "--target-macs", "0.6"],
    ["--filters", "0.3", "--scorer", "activation", "--eval", "{root}/models/mnist_eval.npz"],
]
REAL_SETTINGS = [["--filters", "0.3", "--recover", "none"],
                 ["--target-macs", "0.7", "--scorer", "pfp", "--calib", "{calib}", "--calib-samples", "8"]]
WALL_TIME = re.compile(r"\d+(\.\d+)?\s*(s|ms)\b")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def run(model: Path, settings: list[str], work: Path, calib: Path | None, shapes=None) -> str:
    out, plan, report = work / "out.onnx", work / "plan.json", work / "report.json"
    for f in (out, plan, report):
        f.unlink(missing_ok=True)
    args = [str(model), str(out), "--plan-out", str(plan), "--report", str(report)]
    args += [a.format(calib=calib, root=ROOT) for a in settings]
    for name, dims in (shapes or {}).items():
        args += ["--input-shape", f"{name}:{'x'.join(map(str, dims))}"]
    result = CliRunner().invoke(cli, ["prune", *args])
    parts = [f"exit={result.exit_code}"]
    for label, f in (("model", out), ("plan", plan)):
        parts.append(f"{label}={digest(f.read_bytes()) if f.exists() else '-'}")
    if report.exists():
        data = json.loads(report.read_text())
        data.pop("timings_s", None)
        data.get("latency", {}).clear()
        parts.append(f"report={digest(json.dumps(data, sort_keys=True).encode())}")
    else:
        parts.append("report=-")
    parts.append(f"text={digest(WALL_TIME.sub('T', result.output).encode())}")
    return " ".join(parts)


def feed_file(model: onnx.ModelProto, path: Path, samples: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        arrays[value.name] = rng.standard_normal([samples, *dims[1:]]).astype(np.float32)
    np.savez(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="builders and MNIST only")
    parser.add_argument("--only", default="", help="run only rows whose label contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for name, build in sorted(builders.all_builders().items()):
            model = build()
            path = work / f"{name}.onnx"
            onnx.save(model, path)
            calib = feed_file(model, work / f"{name}.npz")
            rows += [(f"{name} {' '.join(s)}", path, s, calib, None) for s in BUILDER_SETTINGS]
        mnist = ROOT / "models" / "mnist_resnet.onnx"
        rows += [(f"mnist {' '.join(s)}", mnist, ["--calib", str(ROOT / "models" / "mnist_calib.npz"), *s],
                  None, None) for s in MNIST_SETTINGS]
        if not args.quick:
            for name in sorted(REGISTRY):
                try:
                    path = fetch(name)
                except Exception as exc:  # not cached and no registry: say so, do not fail the others
                    print(f"{name}: unavailable ({exc})")
                    continue
                feeds = [random_feed(name, seed) for seed in range(8)]
                calib = work / f"{name}.npz"
                np.savez(calib, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
                rows += [(f"{name} {' '.join(s)}", path, s, calib, input_shapes(name)) for s in REAL_SETTINGS]
        for label, path, settings, calib, shapes in rows:
            if args.only in label:
                print(f"{label.replace(str(work), '').replace(str(ROOT), '')}: {run(path, settings, work, calib, shapes)}",
                      flush=True)


if __name__ == "__main__":
    main()
