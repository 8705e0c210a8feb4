"""Sparsity patterns of a weight matrix [outputs, features] (features in the op handler's `to_matrix` order:
input channel first, then kernel offset), and the keep masks that meet them.

- `unstructured`: any weight may go.
- `N:M`: in every run of M consecutive features of an output row, N weights stay (NVIDIA's 2:4 is 2 of 4).
- `block:RxC`: whole blocks of R outputs by C consecutive features go together.

A pattern's *units* are what is removed together (a weight, or a block); `unit_costs` sums the weights'
costs per unit and `keep_mask` keeps the costliest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

PATTERN_HELP = "give unstructured, N:M (N kept of every M, e.g. 2:4) or block:RxC (e.g. block:4x1)"


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured", "nm" or "block"
    n: int = 1  # N:M: weights kept per run; block: rows per block
    m: int = 1  # N:M: run length; block: features per block

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}", "block": f"block:{self.n}x{self.m}"}[self.kind]

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes each layer's sparsity at 1 - N/M; the others take any."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def unit_shape(self) -> tuple[int, int]:
        return (self.n, self.m) if self.kind == "block" else (1, 1)

    def fits(self, outputs: int, features: int) -> str:
        """Why a [outputs, features] matrix cannot take the pattern, or ""."""
        if self.kind == "nm" and features % self.m:
            return f"{features} input features are not a multiple of {self.m} ({self})"
        rows, cols = self.unit_shape()
        if outputs % rows or features % cols:
            return f"a {outputs}x{features} weight does not split into {rows}x{cols} blocks"
        return ""


def parse_pattern(text: str) -> Pattern:
    """`--sparsity-pattern` value as a Pattern; a UsageError for anything else."""
    value = str(text).strip().lower()
    try:
        if value == "unstructured":
            return Pattern("unstructured")
        if value.startswith("block:"):
            rows, cols = (int(v) for v in value[len("block:"):].split("x"))
            if rows >= 1 and cols >= 1 and rows * cols > 1:
                return Pattern("block", rows, cols)
        elif ":" in value:
            n, m = (int(v) for v in value.split(":"))
            if 1 <= n < m:
                return Pattern("nm", n, m)
    except ValueError:
        pass
    raise UsageError(f"--sparsity-pattern {text!r} is not a pattern: {PATTERN_HELP}")


def unit_costs(costs: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Per removable unit, the summed cost of its weights: [outputs / R, features / C] (a weight is a 1x1 unit)."""
    rows, cols = pattern.unit_shape()
    out, features = costs.shape
    return costs.reshape(out // rows, rows, features // cols, cols).sum(axis=(1, 3))


def keep_mask(costs: np.ndarray, pattern: Pattern, fraction: float) -> np.ndarray:
    """Boolean keep mask [outputs, features] removing the cheapest units: `fraction` of them (rounded), or for
    N:M the M - N cheapest of every run of M features in each row."""
    if pattern.kind == "nm":
        out, features = costs.shape
        runs = costs.reshape(out, features // pattern.m, pattern.m)
        order = np.argsort(runs, axis=2, kind="stable")
        keep = np.zeros(runs.shape, dtype=bool)
        np.put_along_axis(keep, order[:, :, pattern.m - pattern.n:], True, axis=2)
        return keep.reshape(out, features)
    units = unit_costs(costs, pattern)
    removed = int(round(fraction * units.size))
    keep = np.ones(units.size, dtype=bool)
    keep[np.argsort(units, axis=None, kind="stable")[:removed]] = False
    rows, cols = pattern.unit_shape()
    return np.repeat(np.repeat(keep.reshape(units.shape), rows, axis=0), cols, axis=1)
