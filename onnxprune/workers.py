"""Threads for numeric work: one worker per core, numpy's BLAS on one thread while they run.

numpy releases the GIL inside BLAS and its loops, so independent numeric jobs (one layer's statistics,
one group's greedy removal) run side by side in threads. OpenBLAS would give each of them as many
threads as cores as well, and its threads wait for each other by spinning: on 2 cores shared with other
work, BLAS on two threads ran obs's scoring 2.5x slower than on one (bench/speed_recovery.py, README
"Recovery"). threadpoolctl limits the BLAS threads while the pool is open (process-wide, so the caller's
own numpy work meanwhile runs on one BLAS thread too, and a pool opened by another thread waits for this
one to close; onnxruntime keeps its own threads). OpenBLAS's sums differ in
their last bits between thread counts, so in the pool they no longer depend on the machine's cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
import threading
from collections import deque
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

WORKERS = os.cpu_count() or 1
_one_at_a_time = threading.RLock()  # the BLAS limit is process-wide: a second thread's pool waits (nesting in the
# same thread is fine; a pool opened inside a pool's job, another thread, would wait for ever)


@contextmanager
def numeric_pool(workers: int = WORKERS) -> Iterator[ThreadPoolExecutor]:
    """A thread pool of `workers`, numpy's BLAS on one thread until it is closed. On an error in the
    caller, jobs not yet started are dropped (the running ones finish)."""
    with _one_at_a_time, threadpool_limits(limits=1, user_api="blas"):
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def ordered(pool: ThreadPoolExecutor, job, items, ahead: int = WORKERS + 1) -> Iterator:
    """`job` over `items` in `pool`, the results in order, at most `ahead` of them running or done and not
    yet taken: a slow reader does not pile up every result (`pool.map` submits all at once)."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(job, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
