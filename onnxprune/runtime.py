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
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

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
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return build_session(model, options, prepack=timed)


def build_session(model: onnx.ModelProto | str | os.PathLike, options: ort.SessionOptions,
                  prepack: bool = False) -> ort.InferenceSession:
    """A CPU session for `model`, read from its file (see the module docstring; `prepack`: pre-packed
    weights also with external data)."""
    if intra_op_threads and not options.intra_op_num_threads:
        options.intra_op_num_threads = intra_op_threads
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
