"""A model over 2 GB (saved with external data) through the whole CLI job.

    python bench/bench_big_model.py [--gib 2.2]

Builds a 4-layer MLP whose weights add up to over 2 GB (each under protobuf's limit), saves it with
external data in a temporary directory, runs `onnxprune IN OUT --filters 0.5`, and prints wall time,
peak memory of the pruning process and the sizes written. Needs about 6x the model size in RAM.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper


def build(directory: Path, gib: float) -> Path:
    """An MLP 1024 -> H -> 1024 -> H -> 1024 whose four weights (each under protobuf's 2 GB) add up to `gib`."""
    width = 1024
    hidden = int(gib * 2**30 / 4 / (4 * width)) + 1
    rng = np.random.default_rng(0)
    shapes = [(width, hidden), (hidden, width), (width, hidden), (hidden, width)]
    nodes, x = [], "x"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("m3", onnx.TensorProto.FLOAT, [1, width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = directory / "big.onnx"
    with open(directory / "big.onnx.data", "wb") as data:  # the whole model never sits in one protobuf
        for i, shape in enumerate(shapes):
            values = (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[0]))).astype(np.float32).tobytes()
            tensor = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=shape)
            for key, value in (("location", "big.onnx.data"), ("offset", str(data.tell())), ("length", str(len(values)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            data.write(values)
            model.graph.initializer.append(tensor)
    onnx.save_model(model, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), args.gib)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        out = Path(tmp) / "out.onnx"
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "onnxprune.cli", str(path), str(out),
                               "--filters", "0.5", "--debug"], capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(proc.stdout)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            sys.exit(proc.returncode)
        peak_kb = int(proc.stderr.strip().splitlines()[-1])
        written = {p.name: p.stat().st_size for p in Path(tmp).iterdir() if p.name.startswith("out")}
        print(f"{'model GiB':>10}{'wall s':>9}{'peak GiB':>10}{'peak/size':>10}  written")
        print(f"{size / 2**30:>10.2f}{wall:>9.1f}{peak_kb / 2**20:>10.2f}{peak_kb * 1024 / size:>10.1f}  {written}")


if __name__ == "__main__":
    main()
