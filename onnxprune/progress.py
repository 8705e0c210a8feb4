"""Progress bars for the stages that take seconds (capture passes, onnxruntime runs, sweeps), drawn by
tqdm on stderr and only when stderr is a terminal: never in logs, CI output or tests."""

from __future__ import annotations

import sys

from tqdm import tqdm

enabled = True  # the CLI turns bars off with --quiet


def bar(iterable=None, label: str = "", total: int | None = None) -> tqdm:
    """`iterable` (or a bar to `update` by hand when None) with a bar labelled `label`; the bar is removed
    when done."""
    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, desc=label, total=total, leave=False, disable=not shown, file=sys.stderr,
                dynamic_ncols=True)
