"""Models over 2 GB (saved with external data) through the whole CLI job, in bounded memory.

    python bench/bench_big_model.py [--gib 2.2] [--one-tensor-gib 2.1] [--samples 4]

Builds, in a temporary directory (never committed), each model asked for (0 skips one):
  --gib             a 4-layer MLP 1024 -> H -> 1024 -> H -> 1024 whose four weights add up to GIB
  --one-tensor-gib  an MLP 1024 -> H -> 64 whose first weight alone is GIB (over protobuf's 2 GB)
and runs `onnxprune IN OUT --filters 0.5 --calib X.npz --scorer wanda --recover none` on each: a
calibration capture on a few samples (wanda reads every layer's input activations), without the
least-squares recovery, whose H x H statistics would not fit any machine at these widths.

Prints a table: model size, peak resident memory of the pruning process (`/usr/bin/time`; file pages
mapped count as well), peak/size, wall time and time per GiB, and whether the output is correct: it
runs in onnxruntime and its output equals a reference computed in numpy from the original's weights
sliced to the channels the plan (--plan-out) keeps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

WIDTH = 1024


def build(directory: Path, shapes: list[tuple[int, int]]) -> Path:
    """An MLP of MatMuls with these weight shapes (ReLU between), written tensor by tensor to
    'big.onnx.data': the weights never sit in one protobuf, nor whole in memory."""
    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    for i in range(len(shapes)):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        if i < len(shapes) - 1:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    last = f"m{len(shapes) - 1}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, [1, shapes[-1][1]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with open(directory / "big.onnx.data", "wb") as data:
        for i, (rows, cols) in enumerate(shapes):
            tensor = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=(rows, cols))
            start = data.tell()
            for first in range(0, rows, 4096):  # in blocks of rows
                block = rng.standard_normal((min(4096, rows - first), cols), dtype=np.float32)
                data.write((block / np.float32(np.sqrt(rows))).tobytes())
            for key, value in (("location", "big.onnx.data"), ("offset", str(start)), ("length", str(data.tell() - start))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            model.graph.initializer.append(tensor)
    onnx.save_model(model, str(directory / "big.onnx"))
    return directory / "big.onnx"


def mlp_shapes(gib: float) -> list[tuple[int, int]]:
    hidden = int(gib * 2**30 / 4 / (4 * WIDTH)) + 1
    return [(WIDTH, hidden), (hidden, WIDTH), (WIDTH, hidden), (hidden, WIDTH)]


def one_tensor_shapes(gib: float) -> list[tuple[int, int]]:
    return [(WIDTH, int(gib * 2**30 / 4 / WIDTH) + 1), (int(gib * 2**30 / 4 / WIDTH) + 1, 64)]


def reference(source: Path, shapes, plan: dict, x: np.ndarray) -> np.ndarray:
    """The pruned model's output computed from the original's weights, sliced to the kept channels."""
    kept = {group["sources"][0]: np.asarray(group["keep"]) for group in plan["groups"]}
    data = np.memmap(source.parent / "big.onnx.data", dtype=np.float32, mode="r")
    offset, h = 0, x
    for i, (rows, cols) in enumerate(shapes):
        weight = data[offset:offset + rows * cols].reshape(rows, cols)
        offset += rows * cols
        if f"fc{i - 1}" in kept:
            weight = weight[kept[f"fc{i - 1}"]]
        h = h @ (weight[:, kept[f"fc{i}"]] if f"fc{i}" in kept else weight)
        if i < len(shapes) - 1:
            h = np.maximum(h, 0)
    return h


def check(out: Path, source: Path, shapes, plan_path: Path) -> str:
    """'yes' when the pruned model runs and matches `reference` on one input, else what is wrong."""
    x = np.random.default_rng(1).standard_normal((1, WIDTH), dtype=np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    got = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = reference(source, shapes, json.loads(plan_path.read_text()), x)
    if got.shape != expected.shape:
        return f"shape {got.shape} != {expected.shape}"
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    return "yes" if error < 1e-4 else f"no (rel. error {error:.1e})"


def run_case(label: str, shapes, samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-big-") as tmp:
        tmp = Path(tmp)
        source = build(tmp, shapes)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        calib = tmp / "calib.npz"
        np.savez(calib, x=np.random.default_rng(2).standard_normal((samples, WIDTH), dtype=np.float32))
        out, plan = tmp / "out.onnx", tmp / "plan.json"
        command = [sys.executable, "-m", "onnxprune.cli", str(source), str(out), "--filters", "0.5", "--calib",
                   str(calib), "--scorer", "wanda", "--recover", "none", "--plan-out", str(plan), "--quiet"]
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return {"case": label, "size": size, "failed": proc.returncode}
        peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("out.onnx"))
        return {"case": label, "size": size, "peak": peak, "wall": wall, "written": written,
                "largest": max(r * c for r, c in shapes) * 4, "correct": check(out, source, shapes, plan)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.2, help="the 4-layer MLP's size (0: skip)")
    parser.add_argument("--one-tensor-gib", type=float, default=2.1, help="the one-big-tensor MLP's first weight (0: skip)")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples")
    args = parser.parse_args()
    cases = [(f"mlp {args.gib:g} GiB", mlp_shapes(args.gib))] if args.gib else []
    if args.one_tensor_gib:
        cases.append((f"one tensor {args.one_tensor_gib:g} GiB", one_tensor_shapes(args.one_tensor_gib)))
    rows = [run_case(label, shapes, args.samples) for label, shapes in cases]
    print(f"{'case':<22}{'size GiB':>9}{'largest GiB':>12}{'peak GiB':>9}{'peak/size':>10}{'wall s':>8}{'s/GiB':>7}"
          f"{'out GiB':>8}  correct")
    for row in rows:
        gib = row["size"] / 2**30
        if "failed" in row:
            print(f"{row['case']:<22}{gib:>9.2f}  failed with exit code {row['failed']}")
            continue
        print(f"{row['case']:<22}{gib:>9.2f}{row['largest'] / 2**30:>12.2f}{row['peak'] / 2**30:>9.2f}"
              f"{row['peak'] / row['size']:>10.2f}{row['wall']:>8.1f}{row['wall'] / gib:>7.1f}"
              f"{row['written'] / 2**30:>8.2f}  {row['correct']}")


if __name__ == "__main__":
    main()
