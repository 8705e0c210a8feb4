"""The numeric thread pool: BLAS on one thread while it runs, and the scorers' results as without it."""

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from onnxprune.calib import CalibrationSet
from onnxprune.loading import load
from onnxprune.scoring import ScoringContext, score
from onnxprune.scoring import obs as obs_module
from onnxprune.scoring import pfp as pfp_module
from onnxprune.stages import analyze_model
from onnxprune.workers import numeric_pool, ordered
from tests import models


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_the_pool_runs_blas_on_one_thread_and_gives_its_threads_back():
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and max(before) == 2
        with numeric_pool(workers=2) as pool:
            assert list(pool.map(lambda _: _blas_threads(), range(4))) == [[1] * len(before)] * 4
        assert _blas_threads() == before


@contextmanager
def _sequential(workers: int = 1):
    """The pool replaced by one worker, BLAS left on two threads: the results to match (OpenBLAS's sums
    differ in the last bits between thread counts: the curves match to rounding, the rankings exactly)."""
    with threadpool_limits(limits=2, user_api="blas"), ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.mark.parametrize("scorer", ["obs", "pfp"])
@pytest.mark.parametrize("build", [models.residual_downsample, models.grouped])
def test_scores_and_curves_are_those_of_the_sequential_run(scorer, build, monkeypatch):
    model = build()
    analysis = analyze_model(load(model))
    feed = models.random_input(model, 0)
    rng = np.random.default_rng(0)
    calibration = CalibrationSet({k: rng.standard_normal((40, *v.shape[1:])).astype(v.dtype) for k, v in feed.items()})

    def run():
        context = ScoringContext(calibration=calibration, model=model, fixed_batch=1, allocating=True)
        return score(analysis, scorer, context), context.allocation

    pooled, pooled_stats = run()
    monkeypatch.setattr({"obs": obs_module, "pfp": pfp_module}[scorer], "numeric_pool", _sequential)
    alone, alone_stats = run()
    assert pooled.keys() == alone.keys() and len(pooled) > 1
    assert all(np.array_equal(pooled[g], alone[g]) for g in pooled)
    if scorer == "obs":
        assert pooled_stats.curves.keys() == alone_stats.curves.keys() and pooled_stats.curves
        for g, curve in pooled_stats.curves.items():
            # BLAS on one thread (the pool) or on every core sums in another order: on some CPUs the
            # float32 greedy's curves then differ in their 8th digit (3e-8 measured), the ranking not at all
            np.testing.assert_allclose(curve, alone_stats.curves[g], rtol=1e-6, atol=1e-12)


def test_an_error_in_the_caller_drops_the_jobs_not_started():
    started = []
    with pytest.raises(RuntimeError), numeric_pool(workers=1) as pool:
        results = pool.map(lambda i: started.append(i) or time.sleep(0.05), range(50))
        next(results)
        raise RuntimeError("the caller failed")
    assert len(started) < 10


def test_ordered_gives_the_results_in_order_with_at_most_ahead_of_them_waiting():
    import threading

    started = []
    lock = threading.Lock()

    def job(i):
        with lock:
            started.append(i)
        return i * i

    with numeric_pool(2) as pool:
        results = ordered(pool, job, range(10), ahead=2)
        assert next(results) == 0
        time.sleep(0.05)
        assert len(started) <= 3  # the first taken, two more submitted: not all ten
        assert list(results) == [i * i for i in range(1, 10)]
