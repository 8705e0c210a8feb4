"""Activation capture: one onnxruntime pass over the calibration data exposing intermediate tensors.

The model copy gets the requested tensors as extra graph outputs; each batch's activations are handed
to the caller (who folds them into running statistics) and dropped before the next batch is computed,
so memory stays bounded by one batch whatever the number of samples. Every consumer of activations
should ask for all its tensors in one call.

The model comes as a proto or as an `io.ModelFile`: then no parsed copy of it is held while the pass
runs (onnxruntime reads a copy of the file with the outputs appended, or the model parsed again and
written to a temporary file, that copy freed before onnxruntime builds its own).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

import onnxruntime as ort

from ..io import ModelFile, write_model
from ..progress import bar
from ..runtime import EXTERNAL_ABOVE_BYTES, build_session, release_free_memory, with_outputs
from ..workdir import temp_folder
from .data import CalibrationSet


def output_suffix(names: list[str], present=()) -> bytes:
    """Serialized ModelProto bytes that, appended to a serialized model, add `names` (those not in
    `present`) as graph outputs: protobuf parses concatenated messages as one, merged, message, and
    repeated fields (graph.output) are appended."""
    added = [helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(names) if name not in set(present)]
    return onnx.ModelProto(graph=onnx.GraphProto(output=added)).SerializeToString() if added else b""


@contextmanager
def probe_file(model: onnx.ModelProto | ModelFile, names: list[str]) -> Iterator[Path]:
    """A temporary file holding `model` with `names` as extra graph outputs. A verbatim `ModelFile` is
    copied with the outputs appended (no proto parsed); another one is parsed again, the outputs added
    and written, and that proto freed before the block runs."""
    with temp_folder("probe-") as tmp:
        path = Path(tmp) / "probe.onnx"
        if isinstance(model, ModelFile) and model.verbatim:
            shutil.copyfile(model.path, path)
            with path.open("ab") as out:
                out.write(output_suffix(names, model.outputs))
        else:
            proto = model.load() if isinstance(model, ModelFile) else model
            with with_outputs(proto, names) as probe:
                write_model(probe, path, external_above=EXTERNAL_ABOVE_BYTES)
            del proto, probe  # a proto parsed here is freed before onnxruntime builds its session
        yield path


def stream_activations(model: onnx.ModelProto | ModelFile, names: list[str], calibration: CalibrationSet,
                       batch_size: int, progress: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield `{name: activation}` for every batch of `calibration`, in order (one model run per batch).

    Each dict is emptied when the next batch is asked for (the caller's loop variable would otherwise
    keep one batch alive while the next is computed): use its arrays inside the loop, and copy the dict
    (`dict(batch)`) to keep one."""
    with probe_file(model, names) as path:
        sess = capture_session(path)
    batches = calibration.batches(batch_size)
    for feed in bar(batches, progress, total=-(-calibration.count // batch_size)) if progress else batches:
        batch = dict(zip(names, sess.run(names, feed)))
        yield batch
        batch.clear()
    del sess
    release_free_memory()  # the session's weights and arena, before the caller's next stage


def capture_session(model: onnx.ModelProto | str | Path | bytes,
                    external: dict[str, ort.OrtValue] | None = None) -> ort.InferenceSession:
    """A session for capture passes: with onnxruntime's memory arena (it reuses one batch's buffers for
    the next: ~10% faster on ResNet-50) and no spinning workers (numpy runs between batches). `bytes`: a
    serialized model, read from memory (onnxruntime keeps them while the session lives: for short-lived
    sessions of small models, which then need no temporary file). `external`: the values of initializers
    the model declares as external data (kept alive by the caller while the session lives)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")  # one copy of the weights, not two
    if external:
        options.add_external_initializers(list(external), list(external.values()))
    return build_session(model, options)
