"""onnxruntime CPU latency of the original and the pruned model, measured side by side.

Both models run on the same feed (one batch of the evaluation data). After a warm-up, the two are
timed in alternation, one run each per round, so that CPU frequency changes and other load during the
measurement touch both alike; the median of the rounds is reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..runtime import session

DEFAULT_RUNS = 30
DEFAULT_WARMUP = 5
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class LatencyConfig:
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    threads: int = DEFAULT_THREADS  # onnxruntime intra-op threads; 0: onnxruntime's default


def latency_session(model, threads: int):
    return session(model, threads=threads, timed=True)


def model_clock(threads: int):
    """The clock the latency model times with: at one thread, onnxruntime runs on the calling thread, and its
    CPU time is what the run costs however loaded the machine (a loaded machine preempts a whole model's
    run but not a layer's short one, so wall medians do not add up); at several threads, wall time."""
    return time.thread_time if threads == 1 else time.perf_counter


def time_runs(sessions: dict, feed: dict, config: LatencyConfig, clock=time.perf_counter) -> dict[str, np.ndarray]:
    """Seconds per run for each session (on `clock`), runs interleaved across the sessions after the warm-up."""
    outputs = {name: [o.name for o in sess.get_outputs()] for name, sess in sessions.items()}
    for _ in range(config.warmup):
        for name, sess in sessions.items():
            sess.run(outputs[name], feed)
    times = {name: np.empty(config.runs) for name in sessions}
    for i in range(config.runs):
        for name, sess in sessions.items():
            start = clock()
            sess.run(outputs[name], feed)
            times[name][i] = clock() - start
    return times


def summarize(seconds: np.ndarray) -> dict:
    return {"median_ms": float(np.median(seconds) * 1e3), "p90_ms": float(np.percentile(seconds, 90) * 1e3)}


def compare_latency(original_session, pruned_model, feed: dict, config: LatencyConfig) -> dict:
    """Latency of both models and the speedup (original median / pruned median)."""
    pruned_session = latency_session(pruned_model, config.threads)
    times = time_runs({"before": original_session, "after": pruned_session}, feed, config)
    before, after = summarize(times["before"]), summarize(times["after"])
    batch = len(next(iter(feed.values())))
    return {
        "before": before,
        "after": after,
        "speedup": before["median_ms"] / after["median_ms"] if after["median_ms"] > 0 else None,
        "runs": config.runs,
        "warmup": config.warmup,
        "threads": config.threads,
        "batch": int(batch),
    }
