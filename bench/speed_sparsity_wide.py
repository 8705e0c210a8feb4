"""The sparsity stage's update on a wide layer: SparseGPT's sequential update (used above
`solve.EXACT_FEATURES` input features) against the exact per-row solve, time and relative output error.

    python bench/speed_sparsity_wide.py

A synthetic layer of 512 outputs and 4608 features (a 3x3 conv over 512 channels), inputs correlated
between neighbouring features, 50% of the weights zeroed by their OBS costs. The exact solve is timed on
2 rows and extrapolated (all 512 take hours).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.lowrank.decompose import relative_error  # noqa: E402
from onnxprune.sparsity import solve  # noqa: E402
from onnxprune.sparsity.patterns import Pattern, keep_mask  # noqa: E402

OUTPUTS, FEATURES, SAMPLES, EXACT_ROWS = 512, 4608, 6000, 2


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, FEATURES))
    x[:, 1:] += 0.5 * x[:, :-1]
    gram = x.T @ x / SAMPLES
    weight = rng.standard_normal((OUTPUTS, FEATURES)) * 0.05
    keep = keep_mask(solve.weight_costs(weight, gram), Pattern("unstructured"), 0.5)
    started = time.perf_counter()
    sequential = solve.sequential_update(weight, keep, gram)
    sequential_s = time.perf_counter() - started
    rows = slice(0, EXACT_ROWS)
    solve.EXACT_FEATURES = FEATURES  # the exact solve, on a few rows
    started = time.perf_counter()
    exact = solve.optimal_update(weight[rows], keep[rows], gram)
    exact_s = time.perf_counter() - started
    zeroed = np.where(keep, weight, 0.0)
    print(f"layer {OUTPUTS} x {FEATURES}, 50% zeroed")
    print(f"{'update':<12}{'time s':>10}{'rel. error (first rows)':>25}{'rel. error (all rows)':>23}")
    print(f"{'sequential':<12}{sequential_s:>10.1f}{relative_error(weight[rows].T, sequential[rows].T, gram):>25.3f}"
          f"{relative_error(weight.T, sequential.T, gram):>23.3f}")
    print(f"{'exact':<12}{exact_s / EXACT_ROWS * OUTPUTS:>10.0f}{relative_error(weight[rows].T, exact.T, gram):>25.3f}"
          f"{'(extrapolated time)':>23}")
    print(f"{'none':<12}{0.0:>10.1f}{relative_error(weight[rows].T, zeroed[rows].T, gram):>25.3f}"
          f"{relative_error(weight.T, zeroed.T, gram):>23.3f}")


if __name__ == "__main__":
    main()
