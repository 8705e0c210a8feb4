"""Where a model's time goes, per op type, with onnxruntime's profiler on the optimized graph (one thread):
node names change when a model is pruned and optimized, op types do not. Convs are split by shape (depthwise,
1x1, other), as they scale differently. Beside the time, each op type's work: MACs for convs and matrix
products, output elements for the rest (what a memory-bound op's time follows)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.runtime import build_session  # noqa: E402

MATRIX_OPS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm"}


def label(op: str, inputs: list[list[int]]) -> str:
    if op in ("Conv", "FusedConv") and len(inputs) > 1 and len(inputs[1]) == 4:
        weight = inputs[1]
        grouped = len(inputs[0]) > 1 and inputs[0][1] > 1  # one input channel per group of a many-channel input
        kind = "depthwise" if weight[1] == 1 and grouped else "1x1" if weight[2:] == [1, 1] else "kxk"
        return f"{op} {kind}"
    return op


def work(op: str, inputs: list[list[int]], output: list[int]) -> tuple[str, int]:
    """("MACs" or "elements", the amount) of one node run."""
    elements = int(np.prod(output)) if output else 0
    if op in ("Conv", "FusedConv") and len(inputs) > 1:
        return "MACs", elements * int(np.prod(inputs[1][1:]))
    if op in MATRIX_OPS and len(inputs) > 1:
        return "MACs", elements * inputs[0][-1]
    return "elements", elements


def shapes(values: list[dict]) -> list[list[int]]:
    return [next(iter(v.values())) for v in values]


def profile(models: dict, feed: dict, runs: int, warmup: int = 5) -> dict[str, dict[str, tuple[float, str, int]]]:
    """For each model (name -> ModelProto): op type label -> (median ms per run, work unit, work per run), the
    models' runs interleaved in one loop after `warmup` runs each."""
    with tempfile.TemporaryDirectory(prefix="by-op-") as directory:
        sessions = {}
        for name, model in models.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(directory) / name.replace(" ", "_"))
            sessions[name] = build_session(model, options, prepack=True)
        for i in range(warmup + runs):
            for sess in sessions.values():
                sess.run(None, feed)
        return {name: per_op(json.loads(Path(sess.end_profiling()).read_text()), warmup)
                for name, sess in sessions.items()}


def per_op(events: list[dict], warmup: int) -> dict[str, tuple[float, str, int]]:
    """Each op type's time per run, from a profile's events: the sum over its nodes of each node's median kernel
    time over the measured runs (a node's median, not a run's: on a loaded machine the scheduler preempts a long
    run more often than a short one, and one preempted kernel would make its whole run's sum an outlier)."""
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    starts = np.array([ts for ts, _ in runs])
    durations: dict[str, list[float]] = {}
    kinds: dict[str, tuple[str, str, int]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if run < warmup:
            continue
        durations.setdefault(event["name"], []).append(event["dur"] / 1e3)
        if event["name"] not in kinds:
            op, inputs = event["args"]["op_name"], shapes(event["args"].get("input_type_shape", []))
            output = (shapes(event["args"].get("output_type_shape", [])) or [[]])[0]
            kinds[event["name"]] = (label(op, inputs), *work(op, inputs, output))
    result: dict[str, tuple[float, str, int]] = {}
    for node, ms in durations.items():
        key, unit, amount = kinds[node]
        total, _, amounts = result.get(key, (0.0, unit, 0))
        result[key] = (total + float(np.median(ms)), unit, amounts + amount)
    kernels = sum(ms for ms, _, _ in result.values())
    result["(outside kernels)"] = (float(np.median([dur for _, dur in runs[warmup:]])) / 1e3 - kernels, "elements", 0)
    return result


def table(original: dict, pruned: dict) -> list[str]:
    """Markdown rows: op type, ms original, ms pruned, time ratio, work ratio, and the ms the pruned model spends
    beyond what time falling with the work would leave; then the kernels' sum, the time outside the kernels
    (the executor's and the profiler's own per-node overhead, and on a loaded machine the run's preemptions)
    and the whole run (its median)."""
    outside = "(outside kernels)"
    kernels = sorted((set(original) | set(pruned)) - {outside}, key=lambda k: -original.get(k, pruned.get(k))[0])
    lines = ["| op type | ms original | ms pruned | time ratio | work original (M) | work ratio | ms beyond the work ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in kernels:
        ms_o, unit, work_o = original.get(key, (0.0, "elements", 0))
        ms_p, _, work_p = pruned.get(key, (0.0, unit, 0))
        ratio = f"{ms_p / ms_o:.2f}" if ms_o else "-"
        work_ratio = f"{work_p / work_o:.2f} ({unit})" if work_o else "-"
        excess = f"{ms_p - ms_o * work_p / work_o:+.3f}" if work_o else "-"
        lines.append(f"| {key} | {ms_o:.3f} | {ms_p:.3f} | {ratio} | {work_o / 1e6:.2f} | {work_ratio} | {excess} |")
    sums = [sum(times[k][0] for k in kernels if k in times) for times in (original, pruned)]
    for name, values in (("all kernels", sums), (outside, [original[outside][0], pruned[outside][0]]),
                         ("whole run", [sums[0] + original[outside][0], sums[1] + pruned[outside][0]])):
        lines.append(f"| {name} | {values[0]:.3f} | {values[1]:.3f} | {values[1] / values[0]:.2f} | | | |")
    return lines
