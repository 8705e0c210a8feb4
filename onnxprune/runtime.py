"""onnxruntime sessions for models in memory or on disk, of any size, and the memory they hand back.

Sessions are always built from a file, a model in memory being written to a temporary one first:
onnxruntime's Python wrapper keeps the bytes it was given for the whole life of the session (a second
copy of every weight, ~100 MB for a ResNet-50), while writing the file costs ~0.05 s per 100 MB.
A model with external data is run without pre-packed weights unless timed: onnxruntime then maps the
data file instead of copying every weight into a packed buffer (measured on a 0.5 GiB MLP: 0.05 GiB
after the session is built instead of 0.68 GiB).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import ModelError
from .io import has_external_data, write_model
from .workdir import temp_folder

MAX_BATCH = 32  # samples per run when memory allows more: larger batches are no faster on CPU
RUN_BUDGET_BYTES = 96 << 20  # onnxruntime's buffers for one batch of a validation run: about 4x the model's
# largest tensor per sample (measured on ResNet-50: 430 MB at 32 samples of 3x224x224)
intra_op_threads = 0  # onnxruntime's threads where a caller does not say; 0: one per core. A Ray worker sets
# its share of the cores (cluster.py): workers side by side would otherwise each start one thread per core


# A temporary model over this size is written with external data, which onnxruntime maps instead of
# reading the file into a buffer and copying every weight out of it (and pre-packing them).
EXTERNAL_ABOVE_BYTES = 256 << 20


@contextmanager
def on_disk(model: onnx.ModelProto | str | os.PathLike, copy_mapped: bool = False):
    """A path to the model: as given, or a temporary file (with external data when large; see
    `io.write_model` for `copy_mapped`)."""
    if not isinstance(model, onnx.ModelProto):
        yield Path(model)
        return
    with temp_folder("session-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_model(model, path, copy_mapped, external_above=EXTERNAL_ABOVE_BYTES)
        yield path


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 0, timed: bool = False) -> ort.InferenceSession:
    """`timed`: a session for latency measurement, with onnxruntime's pre-packed weights in any case."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its errors reach the caller as exceptions, logged they would be said twice
    if threads:
        options.intra_op_num_threads = threads
    return build_session(model, options, prepack=timed)


def build_session(model: onnx.ModelProto | str | os.PathLike | bytes, options: ort.SessionOptions,
                  prepack: bool = False) -> ort.InferenceSession:
    """A CPU session for `model`, read from its file (see the module docstring; `prepack`: pre-packed
    weights also with external data); `bytes`, a small serialized model, is read from memory."""
    if intra_op_threads and not options.intra_op_num_threads:
        options.intra_op_num_threads = intra_op_threads
    if isinstance(model, bytes):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with on_disk(model) as path:
        if not prepack and has_external_data(path):
            options.add_session_config_entry("session.disable_prepacking", "1")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    release_free_memory()  # onnxruntime's working copies of the weights while it optimized the graph
    return sess


def release_free_memory() -> None:
    """Hand memory freed by onnxruntime back to the OS (glibc keeps it otherwise), so the next large
    allocation does not come on top of it. A no-op where glibc is not the C library."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> int | None:
    """Bytes of memory the machine can still hand out (MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# The child process of `first_run` (argv: the model file, an .npz of the feeds as arr_0, arr_1, ..., their
# names as JSON): it says which step it starts, and ends with "failed <step>: <onnxruntime's message>"
# when that step raises.
_FIRST_RUN = """
import json, sys
sys.path[:0] = json.loads(sys.argv[4])  # the parent's import path (-I drops PYTHONPATH, which may hold onnxruntime)
import numpy as np, onnxruntime as ort
step = "session"
try:
    print(step, flush=True)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    step = "run"
    print(step, flush=True)
    with np.load(sys.argv[2]) as arrays:
        sess.run(None, {name: arrays[f"arr_{i}"] for i, name in enumerate(json.loads(sys.argv[3]))})
except Exception as exc:
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(f"failed {step}: {message}", flush=True)
"""


def first_run(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray]) -> str | None:
    """Create a session of `model` and run it once on `feeds`, in a child process, so that a native crash
    of onnxruntime on a broken or hostile model becomes a one-line ModelError, as does a model onnxruntime
    refuses to load. A run that raises is the data's or the model's fault: its message is returned."""
    with temp_folder("first-run-") as tmp, on_disk(model) as path:
        np.savez(Path(tmp) / "feeds.npz", *feeds.values())
        child = subprocess.run([sys.executable, "-I", "-c", _FIRST_RUN, str(path), str(Path(tmp) / "feeds.npz"),
                                json.dumps(list(feeds)), json.dumps([p for p in sys.path if p])],
                               capture_output=True, text=True, errors="replace")
    lines = child.stdout.strip().splitlines() or ["session"]
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        memory = " (out of memory?)" if -child.returncode == signal.SIGKILL else ""
        doing = "creating a session for" if lines[-1] == "session" else "running"
        raise ModelError(f"onnxruntime crashed ({name}{memory}) {doing} the model once: the model is broken in a "
                         "way the ONNX checker does not see; fix or re-export it")
    failed = lines[-1] if lines[-1].startswith("failed ") else None
    if failed and failed.startswith("failed session: "):
        raise ModelError(f"onnxruntime cannot load the model ({short_message(failed[len('failed session: '):])}): "
                         "fix or re-export it")
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1][-300:]
        raise ModelError(f"the process trying the model in onnxruntime exited with code {child.returncode} ({last}): "
                         "check that this Python runs onnxruntime (python -I -c 'import onnxruntime')")
    return failed[len("failed run: "):] if failed else None


def short_message(message: str) -> str:
    """The first line of onnxruntime's message, without its '[ONNXRuntimeError] : 1 : FAIL : ' prefix."""
    first = (str(message).strip().splitlines() or [""])[0]
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)


def is_onnxruntime_error(exc: BaseException) -> bool:
    """Whether onnxruntime raised `exc` (its exception classes derive from Exception only)."""
    return type(exc).__module__.startswith("onnxruntime")


@contextmanager
def with_outputs(model: onnx.ModelProto, names: list[str]):
    """`model` with `names` added as graph outputs (types left for onnxruntime to infer) while the block
    runs, removed afterwards: a session built inside holds its own copy, and no second copy of the
    weights is made (a proto copy would double the memory of a large model)."""
    outputs = model.graph.output
    before = len(outputs)
    present = {o.name for o in outputs}
    outputs.extend(helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(names) if name not in present)
    try:
        yield model
    finally:
        del outputs[before:]


def batch_within(budget_bytes: int, sample_bytes: int, most: int = MAX_BATCH) -> int:
    """Samples per batch: as many as fit `budget_bytes` at `sample_bytes` each, between 1 and `most`."""
    return int(max(1, min(most, budget_bytes // max(sample_bytes, 1))))


def float_bytes(shapes: dict, names) -> int:
    """Bytes of one sample of the float32 tensors `names` (dims after the batch; unknown dims count 1)."""
    return sum(4 * int(np.prod([d or 1 for d in (shapes.get(name) or ())[1:]], dtype=np.int64)) for name in names)


def run_batch_size(fixed_batch: int | None, shapes: dict | None = None) -> int:
    """Samples per onnxruntime run: the model's fixed batch, else MAX_BATCH, or fewer when the model's
    tensor `shapes` say a batch would need more than RUN_BUDGET_BYTES."""
    if fixed_batch:
        return fixed_batch
    sizes = [int(np.prod(dims[1:], dtype=np.int64)) for dims in (shapes or {}).values()
             if dims and all(isinstance(d, int) and d > 0 for d in dims[1:])]
    return batch_within(RUN_BUDGET_BYTES, 4 * 4 * max(sizes, default=0))  # four float32 tensors of the largest size
