"""The fuzz tier: seeded hostile and broken inputs for the command line, and the checks every run must pass.

`make_case(seed, directory)` writes one case's input files into `directory` (a model mutated from a real or
built one, calibration data, a loader script, ...) and returns its `Case`: the mutation kind and the
command-line arguments. `run_case` runs it, in-process (click's runner) or, for the mutations that may
crash natively, in a subprocess, and classifies the outcome: "ok" (exit 0 with a valid model), "refused"
(exit 2 or 3 with a one-line error), "gate" (exit 1 with a one-line message), or one of the failures in
FAILURES. tests/test_fuzz.py runs 100 seeds; bench/fuzz.py runs as many as asked and tabulates them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_resnet.onnx"
MNIST_CALIB = ROOT / "models" / "mnist_calib.npz"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# small built models for most cases: quick to prune, and between them most op families
BUILT = ("conv_chain", "residual", "residual_downsample", "grouped", "depthwise", "mlp", "flatten_gemm",
         "conv_bn_relu", "concat", "split", "conv_transpose", "attention", "instance_norm", "pooling_MaxPool",
         "lstm_states_peepholes", "resize", "pad")
LIGHT_MODELS = ("light_squeezenet.onnx", "light_bvlc_alexnet.onnx")  # real topologies (bench only: larger)
FAILURES = ("bug", "traceback", "signal", "hang", "multi-line", "invalid-output", "input-changed", "left-behind")
TIMEOUT_S = 120
OUTPUTS = ("out.onnx", "out.onnx.data", "out.latency.json")  # what a successful run may write


@dataclass
class Case:
    kind: str  # the mutation
    args: list[str]  # command-line arguments
    native: bool = False  # may crash onnxruntime natively: run in a subprocess
    note: str = ""  # what exactly was mutated


@dataclass
class Outcome:
    kind: str
    result: str  # "ok", "refused", "gate" or one of FAILURES
    exit_code: int | None
    message: str
    seconds: float
    note: str = ""
    args: list = field(default_factory=list)


# ---------------------------------------------------------------- source models


def built_model(name: str) -> onnx.ModelProto:
    from tests.models import all_builders

    return all_builders()[name]()


def source_model(rng, heavy: bool) -> tuple[str, onnx.ModelProto]:
    """A model to mutate: MNIST, a built one, or (with `heavy`) an onnx light topology."""
    choices = ["mnist"] + list(BUILT) + (list(LIGHT_MODELS) if heavy else [])
    name = choices[rng.integers(len(choices))]
    if name == "mnist":
        return name, onnx.load(str(MNIST))
    if name.startswith("light_"):
        return name, onnx.load(str(LIGHT / name))
    return name, built_model(name)


def feeds_for(model: onnx.ModelProto, count: int, rng) -> dict[str, np.ndarray]:
    """`count` random samples for every graph input (static dims, batch replaced)."""
    inits = {t.name for t in model.graph.initializer}
    arrays = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        arrays[value.name] = rng.standard_normal([count] + dims[1:]).astype(dtype)
    return arrays


# ---------------------------------------------------------------- model mutations


def _node_with_attrs(model, rng):
    nodes = [n for n in model.graph.node if n.attribute]
    return nodes[rng.integers(len(nodes))] if nodes else None


def mutate_attribute(model, rng) -> str:
    """An attribute set to a hostile value: 0, negative, huge, or a list of the wrong length."""
    node = _node_with_attrs(model, rng)
    if node is None:
        return "no attribute"
    attr = node.attribute[rng.integers(len(node.attribute))]
    value = helper.get_attribute_value(attr)
    hostile = [0, -1, 1_000_000, 2**40, -(2**31)][rng.integers(5)]
    if isinstance(value, list) and value and isinstance(value[0], int):
        new = [hostile] * (len(value) if rng.random() < 0.7 else int(rng.integers(0, 6)))
    elif isinstance(value, int):
        new = hostile
    elif isinstance(value, float):
        new = [float("nan"), float("inf"), -1e30, 0.0][rng.integers(4)]
    elif isinstance(value, bytes):
        new = b"NOT_A_MODE"
    else:
        return f"{node.op_type}.{attr.name} left"
    attr.CopyFrom(helper.make_attribute(attr.name, new, attr_type=attr.type))
    return f"{node.op_type} '{node.name}' {attr.name}={new}"


def mutate_dims(model, rng) -> str:
    """An initializer's or an input's dims changed (its data left as it was), or a ConstantOfShape's shape."""
    inits = {t.name: t for t in model.graph.initializer}
    shaped = [n for n in model.graph.node if n.op_type == "ConstantOfShape" and n.input and n.input[0] in inits]
    if shaped and rng.random() < 0.5:
        tensor = inits[shaped[rng.integers(len(shaped))].input[0]]
        shape = [[10**6] * 4, [-3, 4], [0, 7], [2**62, 2]][rng.integers(4)]
        tensor.CopyFrom(numpy_helper.from_array(np.array(shape, np.int64), tensor.name))
        return f"ConstantOfShape '{tensor.name}' = {shape}"
    if rng.random() < 0.5 and model.graph.initializer:
        tensor = model.graph.initializer[rng.integers(len(model.graph.initializer))]
        dims = list(tensor.dims)
        if dims and rng.random() < 0.5:
            dims[rng.integers(len(dims))] += int(rng.choice([-1, 1, 7]))
        else:
            dims = dims + [1] if rng.random() < 0.5 else dims[:-1]
        del tensor.dims[:]
        tensor.dims.extend(max(d, 0) for d in dims)
        return f"initializer '{tensor.name}' dims {dims}"
    value = model.graph.input[0]
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return "input without dims"
    axis = int(rng.integers(len(dims)))
    dims[axis].Clear()
    choice = rng.integers(4)
    if choice == 0:
        dims[axis].dim_param = "free"
    else:
        dims[axis].dim_value = [0, 3, 10**8][choice - 1]
    return f"input '{value.name}' dim {axis} -> {dims[axis]}"


def mutate_dtype(model, rng) -> str:
    """An initializer or the input declared with another element type."""
    types = [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.STRING, TensorProto.BOOL,
             TensorProto.UINT8, TensorProto.COMPLEX64]
    new = types[rng.integers(len(types))]
    if rng.random() < 0.5 and model.graph.initializer:
        tensor = model.graph.initializer[rng.integers(len(model.graph.initializer))]
        array = numpy_helper.to_array(tensor)
        if new in (TensorProto.STRING,):
            tensor.data_type = new  # raw data left: a type the data does not match
        else:
            replaced = numpy_helper.from_array(array.astype(helper.tensor_dtype_to_np_dtype(new)), tensor.name)
            tensor.CopyFrom(replaced)
        return f"initializer '{tensor.name}' as {TensorProto.DataType.Name(new)}"
    if rng.random() < 0.3:
        new = TensorProto.UNDEFINED
    model.graph.input[0].type.tensor_type.elem_type = new
    return f"input as {TensorProto.DataType.Name(new)}"


def mutate_dangling(model, rng) -> str:
    """A node input or a graph output renamed to a tensor nothing produces."""
    if rng.random() < 0.3:
        model.graph.output[0].name = "nowhere"
        return "graph output 'nowhere'"
    node = model.graph.node[rng.integers(len(model.graph.node))]
    if not node.input:
        return "node without inputs"
    node.input[rng.integers(len(node.input))] = "dangling_tensor"
    return f"{node.op_type} '{node.name}' reads 'dangling_tensor'"


def mutate_cycle(model, rng) -> str:
    """An early node reads the output of a later one (a cycle), or two nodes write the same tensor."""
    nodes = model.graph.node
    if len(nodes) < 2:
        return "one node"
    early, late = sorted(rng.choice(len(nodes), 2, replace=False))
    if rng.random() < 0.7 and nodes[early].input:
        nodes[early].input[0] = nodes[late].output[0]
        return f"'{nodes[early].name}' reads '{nodes[late].output[0]}' of a later node"
    nodes[late].output[0] = nodes[early].output[0]
    return f"'{nodes[late].name}' writes '{nodes[early].output[0]}' too"


def mutate_values(model, rng) -> str:
    """NaN or Inf weights."""
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and numpy_helper.to_array(t).size]
    if not floats:
        return "no float weight"
    tensor = floats[rng.integers(len(floats))]
    array = numpy_helper.to_array(tensor).copy()
    bad = [np.nan, np.inf, -np.inf, 3e38][rng.integers(4)]
    if rng.random() < 0.5:
        array.flat[rng.integers(array.size)] = bad
    else:
        array[...] = bad
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return f"'{tensor.name}' holds {bad}"


def mutate_opset(model, rng) -> str:
    """A strange opset, an unknown op or domain, or no graph outputs."""
    choice = rng.integers(4)
    if choice == 0:
        model.opset_import[0].version = int(rng.choice([1, 6, 99]))
        return f"opset {model.opset_import[0].version}"
    if choice == 1:
        node = model.graph.node[rng.integers(len(model.graph.node))]
        node.op_type = "NoSuchOp"
        return f"'{node.name}' is NoSuchOp"
    if choice == 2:
        node = model.graph.node[rng.integers(len(model.graph.node))]
        node.domain = "com.nowhere"
        return f"'{node.name}' in domain com.nowhere"
    del model.graph.output[:]
    return "no graph outputs"


MODEL_MUTATIONS = {"attribute": mutate_attribute, "dims": mutate_dims, "dtype": mutate_dtype,
                   "dangling": mutate_dangling, "cycle": mutate_cycle, "nan-weights": mutate_values,
                   "opset": mutate_opset}


def mutated_bytes(data: bytes, rng) -> tuple[bytes, str]:
    """The serialized model truncated or with bytes flipped."""
    if rng.random() < 0.5:
        cut = int(rng.integers(0, len(data)))
        return data[:cut], f"truncated at {cut} of {len(data)}"
    data = bytearray(data)
    count = int(rng.integers(1, 9))
    for position in rng.integers(0, len(data), count):
        data[position] ^= 1 << int(rng.integers(8))
    return bytes(data), f"{count} bits flipped"


def external_data_case(model, rng, directory: Path) -> str:
    """The model saved with external data, then the data missing, truncated, overwritten or pointing away."""
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    data = directory / "model.onnx.data"
    choice = rng.integers(5)
    if choice == 0:
        data.unlink()
        return "data file missing"
    if choice == 1:
        data.write_bytes(data.read_bytes()[: int(rng.integers(0, data.stat().st_size))])
        return "data file truncated"
    if choice == 2:
        data.write_bytes(rng.bytes(data.stat().st_size))
        return "data file of random bytes"
    proto = onnx.load(str(path), load_external_data=False)
    tensor = proto.graph.initializer[rng.integers(len(proto.graph.initializer))]
    for entry in tensor.external_data:
        if choice == 3 and entry.key == "location":
            entry.value = ["../../etc/passwd", "/etc/hostname", "missing.bin", "."][rng.integers(4)]
        if choice == 4 and entry.key in ("offset", "length"):
            entry.value = str([2**40, -5, 0][rng.integers(3)])
    path.write_bytes(proto.SerializeToString())
    return f"'{tensor.name}' external entry {'location' if choice == 3 else 'offset/length'} hostile"


# ---------------------------------------------------------------- data mutations


def calibration_case(model, rng, directory: Path) -> tuple[list[str], str]:
    """Calibration data that does not fit: wrong names, shapes, dtypes, NaNs, no samples, not an archive."""
    arrays = feeds_for(model, int(rng.integers(1, 6)), rng)
    name = next(iter(arrays))
    path = directory / "calib.npz"
    choice = rng.integers(9)
    if choice == 0:
        arrays = {f"{name}_typo": arrays[name]}
        note = "wrong name"
    elif choice == 1:
        arrays[name] = arrays[name][..., :-1] if arrays[name].ndim > 1 else arrays[name][None]
        note = "wrong shape"
    elif choice == 2:
        dtype = [np.int64, np.float64, np.complex64, np.bool_, np.str_][rng.integers(5)]
        arrays[name] = arrays[name].astype(dtype)
        note = f"dtype {np.dtype(dtype).name}"
    elif choice == 3:
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = [np.nan, np.inf][rng.integers(2)]
        note = "NaN/Inf sample"
    elif choice == 4:
        arrays[name] = arrays[name][:0]
        note = "no samples"
    elif choice == 5:
        path.write_bytes(rng.bytes(int(rng.integers(0, 200))))
        return ["--calib", str(path)], "not an npz"
    elif choice == 6:
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ["--calib", str(path)], "truncated npz"
    elif choice == 7:
        npy = directory / "calib.npy"
        np.save(npy, arrays[name].reshape(-1))
        return ["--calib", str(npy)], ".npy of the wrong shape"
    else:
        arrays[name] = arrays[name][()] if arrays[name].ndim == 0 else np.float32(1.0)
        note = "a scalar"
    np.savez(path, **arrays)
    return ["--calib", str(path)], note


def image_case(rng, directory: Path) -> tuple[list[str], str]:
    """A --calib directory of images that do not decode (or no images at all)."""
    images = directory / "images"
    images.mkdir()
    choice = rng.integers(4)
    if choice == 0:
        (images / "a.png").write_bytes(rng.bytes(100))
        note = "random bytes as .png"
    elif choice == 1:
        (images / "b.jpg").write_bytes(b"")
        note = "empty .jpg"
    elif choice == 2:
        (images / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(40))
        note = "truncated png"
    else:
        (images / "sub").mkdir()
        note = "no images"
    return ["--calib", str(images)], note


LOADERS = {
    "raises": "def data():\n    raise ValueError('broken loader')\n",
    "returns None": "def data():\n    return None\n",
    "yields strings": "def data():\n    yield 'garbage'\n",
    "yields a list": "def data():\n    yield [1, 2, 3]\n",
    "wrong names": "import numpy as np\ndef data():\n    yield {'nope': np.zeros((1, 3), np.float32)}\n",
    "wrong shapes": "import numpy as np\ndef data():\n    for _ in range(3):\n        yield {NAME: np.zeros((1, 2), np.float32)}\n",
    "mixed shapes": "import numpy as np\ndef data():\n    yield {NAME: np.zeros(SHAPE, np.float32)}\n"
                    "    yield {NAME: np.zeros((1, 1), np.float32)}\n",
    "raises midway": "import numpy as np\ndef data():\n    yield {NAME: np.zeros(SHAPE, np.float32)}\n"
                     "    raise RuntimeError('disk gone')\n",
    "nothing": "def data():\n    return iter(())\n",
    "endless": "import numpy as np\ndef data():\n    while True:\n        yield {NAME: np.zeros(SHAPE, np.float32)}\n",
    "syntax error": "def data(:\n",
    "import error": "import no_such_module_at_all\ndef data():\n    return []\n",
    "no function": "x = 1\n",
    "get_next garbage": "class R:\n    def get_next(self):\n        return 42\ndef data():\n    return R()\n",
}


def loader_case(model, rng, directory: Path) -> tuple[list[str], str]:
    """A --data-loader-script that raises, returns garbage or yields what does not fit."""
    kind = list(LOADERS)[rng.integers(len(LOADERS))]
    inputs = feeds_for(model, 1, rng)
    name = next(iter(inputs))
    source = LOADERS[kind].replace("NAME", repr(name)).replace("SHAPE", repr(tuple(inputs[name].shape)))
    (directory / "loader.py").write_text(source)
    return ["--data-loader-script", f"{directory / 'loader.py'}:data"], kind


# ---------------------------------------------------------------- flag combinations

FLAGS = [
    ["--filters", "1.5"], ["--filters", "-0.1"], ["--filters", "nan"], ["--filters", "0.3"], ["--filters", "0.9"],
    ["--rank", "2"], ["--rank", "auto"], ["--rank", "0.5"], ["--rank", "x"], ["--lowrank-error", "3"],
    ["--target-macs", "0"], ["--target-macs", "1.5"], ["--target-macs", "0.6"],
    ["--sparsity", "2"], ["--sparsity", "0.5"], ["--sparsity-pattern", "7:4"], ["--sparsity-pattern", "block:0x2"],
    ["--sparsity-pattern", "2:4"], ["--steps", "0"], ["--steps", "2"], ["--round-to", "0"], ["--global"],
    ["--scorer", "nope"], ["--scorer", "l2"], ["--scorer", "random"], ["--scorer", "bn"],
    ["--input-shape", "x"], ["--input-shape", "x:0x1"], ["--input-shape", "nope:1x3"], ["--input-shape", "x:1x3x-2x4"],
    ["--output-axis", "y"], ["--output-axis", "y:9"], ["--output-axis", "nope:1"],
    ["--min-cosine", "2"], ["--min-cosine", "0.999999"], ["--max-macs", "0.01"], ["--max-accuracy-drop", "0.1"],
    ["--latency-runs", "0"], ["--target-latency", "-1"], ["--target-speedup", "0"],
    ["--recover", "lstsq"], ["--recover", "bias"], ["--recover", "none"], ["--recover", "magic"],
    ["--quantize", "int8"], ["--calib-samples", "0"], ["--calib-batch", "0"], ["--exclude", "*"],
    ["--exclude", "[unclosed"], ["--plan-in", "PLAN"], ["--eval", "missing.npz"], ["--labels", "missing.npy"],
    ["--seed", "-5"], ["--finetune-steps", "-1"], ["--pfp-mode", "sample"], ["--preprocess", "size=0x0"],
]


def flags_case(rng, directory: Path) -> tuple[list[str], str]:
    """Two or three flags, valid and invalid values mixed."""
    chosen = [FLAGS[i] for i in rng.choice(len(FLAGS), int(rng.integers(2, 4)), replace=False)]
    args = []
    for flag in chosen:
        if flag == ["--plan-in", "PLAN"]:
            plan = directory / "plan.json"
            plan.write_text(['{"groups": 3}', "not json", '{"groups": [{"sources": ["x"], "keep": [99]}]}'][rng.integers(3)])
            flag = ["--plan-in", str(plan)]
        if flag[0] in ("--eval", "--labels"):
            flag = [flag[0], str(directory / flag[1])]
        args += flag
    return args, " ".join(args).replace(str(directory) + "/", "")


# ---------------------------------------------------------------- cases

KINDS = ("truncated/flipped", *MODEL_MUTATIONS, "external-data", "calibration", "images", "loader", "flags")


def make_case(seed: int, directory: Path, heavy: bool = False) -> Case:
    """Write case `seed`'s inputs into `directory`; its kind cycles through KINDS."""
    rng = np.random.default_rng(seed)
    kind = KINDS[seed % len(KINDS)]
    name, model = source_model(rng, heavy)
    path, out = directory / "model.onnx", directory / "out.onnx"
    extra, native = [], False
    if kind == "truncated/flipped":
        data, note = mutated_bytes(model.SerializeToString(), rng)
        path.write_bytes(data)
        native = True
    elif kind in MODEL_MUTATIONS:
        note = MODEL_MUTATIONS[kind](model, rng)
        path.write_bytes(model.SerializeToString())
        native = kind == "attribute"
    elif kind == "external-data":
        note = external_data_case(model, rng, directory)
    else:
        onnx.save(model, str(path))
        if name == "mnist":  # keep the expensive default scorer off the 28x28 net
            extra = ["--scorer", "l1", "--recover", "none"]
        if kind == "calibration":
            extra_args, note = calibration_case(model, rng, directory)
            extra += extra_args
        elif kind == "images":
            extra_args, note = image_case(rng, directory)
            extra += extra_args
        elif kind == "loader":
            extra_args, note = loader_case(model, rng, directory)
            extra += extra_args
        else:
            extra_args, note = flags_case(rng, directory)
            extra += extra_args
    inspect = rng.random() < 0.15 and not extra
    command = ["inspect", str(path)] if inspect else [str(path), str(out)]
    return Case(kind, command + ["-q"] + extra, native, f"{name}: {note}")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` and the hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_case(case: Case, directory: Path, timeout: float = TIMEOUT_S) -> Outcome:
    """Run `case` (inputs in `directory`) and classify what happened."""
    before = snapshot(directory)
    started = time.perf_counter()
    if case.native:
        code, stdout, stderr = _run_subprocess(case.args, timeout)
    else:
        code, stdout, stderr = _run_in_process(case.args)
    seconds = time.perf_counter() - started
    after = snapshot(directory)
    result, message = classify(case, directory, before, after, code, stdout, stderr)
    return Outcome(case.kind, result, code, message, seconds, case.note, case.args)


def _run_subprocess(args, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    try:
        child = subprocess.run([sys.executable, "-m", "onnxprune.cli", *args], capture_output=True, text=True,
                               errors="replace", timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return None, "", "hang"
    return child.returncode, child.stdout, child.stderr


def _run_in_process(args):
    from click.testing import CliRunner

    from onnxprune.cli import main

    result = CliRunner().invoke(main, args)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stdout, stderr


def classify(case, directory, before, after, code, stdout, stderr) -> tuple[str, str]:
    text = stderr.strip()
    lines = text.splitlines()
    message = lines[-1] if lines else ""
    if code is None:
        return "hang", f"no exit after {TIMEOUT_S} s"
    if code < 0:
        return "signal", f"killed by signal {-code}"
    if "Traceback" in text:
        return "traceback", message
    changed = [name for name in before if after.get(name) != before[name]]
    if changed:
        return "input-changed", f"{changed} changed"
    new = sorted(set(after) - set(before))
    if code == 4:
        return "bug", message
    if code == 0:
        stray = [name for name in new if name not in OUTPUTS]
        if stray:
            return "left-behind", f"{stray} beside the output"
        if case.args[0] == "inspect":
            return "ok", ""
        problem = _invalid_output(directory / "out.onnx")
        return ("invalid-output", problem) if problem else ("ok", "")
    if len(lines) != 1 or not lines[0].startswith("error:"):
        return "multi-line", " | ".join(lines[-3:])
    if code == 1:
        return "gate", message
    if new:
        return "left-behind", f"{new} left after exit {code}"
    if code in (2, 3):
        return "refused", message
    return "bug", f"exit {code}: {message}"


def _invalid_output(path: Path) -> str | None:
    if not path.exists():
        return "exit 0 without an output"
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - anything wrong with the output is the finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return None


def tally(outcomes: list[Outcome]) -> str:
    """A table: mutation kind x result class, counts."""
    classes = ["ok", "refused", "gate", *FAILURES]
    used = [c for c in classes if any(o.result == c for o in outcomes)] or classes[:2]
    kinds = list(dict.fromkeys(o.kind for o in outcomes))
    width = max(len(k) for k in kinds + ["kind"])
    rows = [f"{'kind':<{width}} " + " ".join(f"{c:>9}" for c in used) + f" {'total':>6} {'s/case':>7}"]
    for kind in kinds + ["all"]:
        mine = [o for o in outcomes if kind == "all" or o.kind == kind]
        rows.append(f"{kind:<{width}} " + " ".join(f"{sum(o.result == c for o in mine):>9}" for c in used)
                    + f" {len(mine):>6} {sum(o.seconds for o in mine) / len(mine):7.2f}")
    return "\n".join(rows)
