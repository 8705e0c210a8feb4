"""Weight sparsity on the default MNIST model: accuracy and fidelity of magnitude against OBS (with the
optimal update) at several sparsities and patterns, the file's size dense and stored, each also
gzip-compressed, and onnxruntime's CPU latency against the dense original.

    python bench/eval_sparsity.py [--runs 300] [--batch 1,32]

The OBS statistics come from models/mnist_calib.npz (256 digits); accuracy, cosine and rel. L2 are measured
on models/mnist_eval.npz (1000 other digits). Sizes are the report's `sparsity.storage` with the default
int64 indices (the written file; the original: 321,194 B, gzip 293,314 B), then the same model stored
with `--sparse-index smallest` (int8-int32 indices, onnxruntime only). Latency: the original and the
sparse model (as written) run alternately, one thread, `--runs` times each per batch size; the column is
the median time of the sparse model over the original's median (1.00: no change).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from onnxprune.sparsity.storage import densified, store_sparse  # noqa: E402

MODEL, CALIB, EVAL = (str(ROOT / "models" / name) for name in ("mnist_resnet.onnx", "mnist_calib.npz", "mnist_eval.npz"))

SETTINGS = [(method, sparsity, "unstructured") for sparsity in (0.5, 0.8, 0.9) for method in ("magnitude", "obs")] + \
    [(method, sparsity, pattern) for sparsity, pattern in ((None, "2:4"), (0.5, "block:4x1"), (0.5, "block:8x8"))
     for method in ("magnitude", "obs")]


def latency_ratio(original, sparse, batch: int, runs: int) -> float:
    """Median time of `sparse` over that of `original`, run alternately on the same batch, one thread."""
    feed = {"input": np.load(EVAL)["input"][:batch]}
    sessions = [session(original, threads=1, timed=True), session(sparse, threads=1, timed=True)]
    times = [[], []]
    for _ in range(runs + 20):
        for sess, kept in zip(sessions, times):
            started = time.perf_counter()
            sess.run(None, feed)
            kept.append(time.perf_counter() - started)
    return float(np.median(times[1][20:]) / np.median(times[0][20:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes for the latency ratios")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    original = onnx.load(MODEL)
    print(f"{'method':<10}{'pattern':<13}{'sparsity':>9}{'accuracy':>10}{'cosine':>8}{'rel.L2':>8}"
          f"{'dense B':>9}{'gzip':>9}{'int64 B':>9}{'gzip':>9}{'small B':>9}{'gzip':>9}"
          + "".join(f"{f'lat b{b}':>8}" for b in batches) + f"{'s':>6}")
    for method, sparsity, pattern in SETTINGS:
        started = time.perf_counter()
        result = prune(MODEL, PruneConfig(sparsity=sparsity, sparsity_pattern=pattern, sparsity_method=method,
                                          calibration=CALIB, evaluation=EVAL))
        elapsed = time.perf_counter() - started
        report = result.report
        storage = report["sparsity"]["storage"]
        _, smallest = store_sparse(densified(result.model), "smallest")
        sizes = [storage[k] for k in ("dense_bytes", "dense_gzip_bytes", "stored_bytes", "gzip_bytes")] + \
            [smallest["stored_bytes"], smallest["gzip_bytes"]]
        ratios = [latency_ratio(original, result.model, b, args.runs) for b in batches]
        print(f"{method:<10}{pattern:<13}{report['sparsity']['achieved']:>9.3f}{report['accuracy']['after']:>10.3f}"
              f"{report['fidelity']['cosine']:>8.4f}{report['fidelity']['rel_l2']:>8.4f}"
              + "".join(f"{size:>9,}" for size in sizes) + "".join(f"{r:>8.2f}" for r in ratios)
              + f"{elapsed:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
