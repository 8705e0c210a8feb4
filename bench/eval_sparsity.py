"""Weight sparsity on the default MNIST model: accuracy and fidelity of magnitude against OBS (with the
optimal update) at several sparsities and patterns, with the file's size dense and stored (sparse
initializers where smaller), each also gzip-compressed.

    python bench/eval_sparsity.py

The OBS statistics come from models/mnist_calib.npz (256 digits); accuracy, cosine and rel. L2 are measured
on models/mnist_eval.npz (1000 other digits). Sizes are the report's `sparsity.storage` (the original
file: 321,194 B, gzip 293,314 B).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import PruneConfig, prune  # noqa: E402

MODEL, CALIB, EVAL = (str(ROOT / "models" / name) for name in ("mnist_resnet.onnx", "mnist_calib.npz", "mnist_eval.npz"))

SETTINGS = [(method, sparsity, "unstructured") for sparsity in (0.5, 0.8, 0.9) for method in ("magnitude", "obs")] + \
    [(method, sparsity, pattern) for sparsity, pattern in ((None, "2:4"), (0.5, "block:4x1")) for method in ("magnitude", "obs")]


def main() -> None:
    print(f"{'method':<10}{'pattern':<13}{'sparsity':>9}{'accuracy':>10}{'cosine':>8}{'rel.L2':>8}"
          f"{'dense B':>9}{'gzip':>9}{'stored B':>9}{'gzip':>9}{'s':>6}")
    for method, sparsity, pattern in SETTINGS:
        started = time.perf_counter()
        result = prune(MODEL, PruneConfig(sparsity=sparsity, sparsity_pattern=pattern, sparsity_method=method,
                                          calibration=CALIB, evaluation=EVAL))
        elapsed = time.perf_counter() - started
        report = result.report
        sizes = (report["sparsity"]["storage"][k] for k in ("dense_bytes", "dense_gzip_bytes", "stored_bytes", "gzip_bytes"))
        print(f"{method:<10}{pattern:<13}{report['sparsity']['achieved']:>9.3f}{report['accuracy']['after']:>10.3f}"
              f"{report['fidelity']['cosine']:>8.4f}{report['fidelity']['rel_l2']:>8.4f}"
              + "".join(f"{size:>9,}" for size in sizes) + f"{elapsed:>6.1f}")


if __name__ == "__main__":
    main()
