"""Threads for numeric work: one worker per core, numpy's BLAS on one thread while they run.

numpy releases the GIL inside BLAS and its loops, so independent numeric jobs (one layer's statistics,
one group's greedy removal) run side by side in threads. OpenBLAS would give each of them as many
threads as cores as well: on 2 cores, 2 workers x 2 BLAS threads oversubscribe them, and OpenBLAS's
threads wait for each other by spinning, so a loaded machine ran 2.5-3x slower (bench/speed_recovery.py,
README "Recovery"). threadpoolctl limits the BLAS threads for the pool's lifetime (process-wide; the
caller's thread only waits meanwhile, onnxruntime keeps its own threads). A job's arithmetic does not
depend on the thread count here: the tests compare the scores with and without the pool.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

WORKERS = os.cpu_count() or 1


@contextmanager
def numeric_pool(workers: int = WORKERS) -> Iterator[ThreadPoolExecutor]:
    """A thread pool of `workers`, numpy's BLAS on one thread until it is closed (and all its jobs done)."""
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool
