"""Threads for numeric work: one worker per core, numpy's BLAS on one thread while they run.

numpy releases the GIL inside BLAS and its loops, so independent numeric jobs (one layer's statistics,
one group's greedy removal) run side by side in threads. OpenBLAS would give each of them as many
threads as cores as well, and its threads wait for each other by spinning: on 2 cores shared with other
work, BLAS on two threads ran obs's scoring 2.5x slower than on one (bench/speed_recovery.py, README
"Recovery"). threadpoolctl limits the BLAS threads while the pool is open (process-wide; the caller's
thread only waits or runs onnxruntime meanwhile, which keeps its own threads). OpenBLAS's sums differ in
their last bits between thread counts, so in the pool they no longer depend on the machine's cores.
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
    """A thread pool of `workers`, numpy's BLAS on one thread until it is closed. On an error in the
    caller, jobs not yet started are dropped (the running ones finish)."""
    with threadpool_limits(limits=1, user_api="blas"):
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
