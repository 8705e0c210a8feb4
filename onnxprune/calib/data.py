"""Calibration sets: named input arrays (plus optional labels), checked against the model's inputs."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import DataError, ModelError, OnnxPruneError, UsageError, first_line
from ..io import graph_inputs
from ..runtime import available_memory
from .images import load_image_folder, parse_preprocess


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # declared dims: int, or None where dynamic
    shape: list[int]  # the static shape used for analysis

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims and self.dims[0] is not None else None


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The smallest batch size the model's inputs declare, or None when every batch dim is dynamic."""
    return min((s.fixed_batch for s in specs if s.fixed_batch), default=None)


def input_specs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> list[InputSpec]:
    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            raise ModelError(f"input '{value.name}' is not a tensor of a known element type: onnxprune feeds "
                             "models tensors only; re-export the model with tensor inputs")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims, list(shapes[value.name])))
    return specs


# Every fifth calibration sample is held out of every fit (scoring statistics, factor and layer fits,
# fine-tuning): fits are checked on them and, without --eval, the result's fidelity is measured there.
HOLD_OUT_EVERY = 5
# A loader or iterable read without --calib-samples stops with an error past this many samples or a quarter
# of the free memory: an endless generator (`while True: yield ...`) must not take the machine down.
MAX_FEED_SAMPLES = 10_000


def held_out(sample: np.ndarray) -> np.ndarray:
    """Whether each calibration sample, by its index in the set, is one of the held-out ones."""
    return sample % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def can_hold_out(calibration: "CalibrationSet", batch: int | None) -> bool:
    """Whether some calibration samples can be held out: there are enough, and a model with a fixed
    batch over 1 is not left with a part it cannot run in whole batches."""
    return calibration.count >= HOLD_OUT_EVERY and (batch or 1) == 1


def held_out_rows(rows: np.ndarray, total: int, samples: int, seen: int) -> np.ndarray:
    """`held_out` for output rows of a batch: `rows` index its `total` rows, sample-major (each of its
    `samples` samples' positions in turn), and `seen` samples came before it."""
    return held_out(seen + rows // max(total // samples, 1))


class CalibrationSet:
    """Samples for every model input, stacked on axis 0; `labels` when the data came with them. A part
    of another set (`part`) shares its arrays and holds the indices of its samples (`index`)."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None, source: str = "calibration",
                 index: np.ndarray | None = None):
        self._arrays = arrays
        self.labels = labels
        self.source = source  # "calibration" or "synthetic"
        self.index = index  # the samples of `arrays` this set holds, in order (None: all of them)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Input name -> samples (for a part, a copy of its samples)."""
        if self.index is None:
            return self._arrays
        return {name: a[self.index] for name, a in self._arrays.items()}

    @property
    def count(self) -> int:
        return len(self.index) if self.index is not None else len(next(iter(self._arrays.values())))

    def batches(self, batch_size: int):
        """Feed dicts of at most `batch_size` samples, in order."""
        for start in range(0, self.count, batch_size):
            rows = slice(start, start + batch_size) if self.index is None else self.index[start:start + batch_size]
            yield {name: a[rows] for name, a in self._arrays.items()}

    def part(self, held: bool) -> "CalibrationSet":
        """The held-out samples (`held`), or the others: the ones fits may use. No array is copied."""
        pick = np.flatnonzero(held_out(np.arange(self.count)) == held)
        labels = None if self.labels is None else self.labels[pick]
        return CalibrationSet(self._arrays, labels, self.source, pick if self.index is None else self.index[pick])

    def spread(self, count: int) -> "CalibrationSet":
        """`count` samples spread evenly over the set, in order (a folder read kind after kind gives each
        kind its share), as arrays of their own like `head`'s."""
        pick = np.linspace(0, self.count - 1, min(count, self.count)).round().astype(int)
        rows = pick if self.index is None else self.index[pick]
        labels = None if self.labels is None else self.labels[pick]
        return CalibrationSet({name: a[rows] for name, a in self._arrays.items()}, labels, self.source)

    def head(self, count: int) -> "CalibrationSet":
        labels = None if self.labels is None else self.labels[:count]
        return CalibrationSet(next(self.batches(count)), labels, self.source)


def load_calibration(source, specs: list[InputSpec], preprocess=None, samples: int | None = None,
                     where: str | None = None) -> CalibrationSet:
    """Read calibration data once into a `CalibrationSet`, checked against the model's inputs.

    `source` is one of: a path to an .npz (arrays named after the inputs, optional `labels`), an .npy
    (one-input model) or a directory of images (`preprocess`: a preset name or key=value pairs, see
    calib/images.py); a `"file.py:function"` loader script; an object with onnxruntime's `get_next()`
    (a CalibrationDataReader); an iterable of feed dicts `{input name: array}`; a dict of arrays; or a
    `CalibrationSet`. `samples` caps the number of samples read.
    """
    if samples is not None and samples < 1:
        raise UsageError(f"--calib-samples {samples}: give a positive number of samples")
    if isinstance(source, CalibrationSet):
        calibration = source
    elif isinstance(source, (str, os.PathLike)) and is_loader_script(str(source)):
        return load_calibration(run_loader_script(str(source)), specs, preprocess, samples, where or str(source))
    elif isinstance(source, (str, os.PathLike)):
        calibration = _load_path(Path(source), specs, preprocess, samples)
        where = where or str(source)
    elif isinstance(source, dict):
        calibration = _from_arrays(source, specs)
    elif hasattr(source, "get_next") or isinstance(source, Iterable):
        calibration = from_feeds(source, specs, where or "the calibration data", samples)
    else:
        raise DataError(f"calibration data of type {type(source).__name__} is not supported: give a path, a "
                        "CalibrationDataReader (get_next()), or an iterable of {input name: array} dicts")
    calibration = check(calibration, specs, where or "the calibration data")
    calibration = calibration.head(samples) if samples is not None and calibration.count > samples else calibration
    return check_whole_batches(calibration, fixed_batch(specs), where or "the calibration data")


def check_whole_batches(calibration: CalibrationSet, batch: int | None, where: str) -> CalibrationSet:
    """`calibration` when a model whose batch is fixed at `batch` can run it in whole batches; else a
    one-line DataError naming the count to give (onnxruntime would refuse the last, partial batch)."""
    if not batch or batch == 1 or calibration.count % batch == 0:
        return calibration
    fits = calibration.count - calibration.count % batch
    fix = f"e.g. the first {fits}: --calib-samples {fits}" if fits else f"at least {batch}"
    raise DataError(f"{where} has {calibration.count} samples and the model's batch is fixed at {batch}: "
                    f"give a multiple of {batch} ({fix}), or export the model with a dynamic batch")


def _load_path(path: Path, specs: list[InputSpec], preprocess, samples: int | None) -> CalibrationSet:
    if not path.exists():
        raise DataError(f"calibration data '{path}' does not exist: check the --calib path")
    if path.is_dir():
        if len(specs) != 1:
            raise DataError(f"a directory of images feeds a one-input model, this one has inputs {[s.name for s in specs]}: "
                            "give an .npz with one array per input")
        return CalibrationSet({specs[0].name: load_image_folder(path, specs[0], parse_preprocess(preprocess), samples)})
    if preprocess is not None:
        raise UsageError("--preprocess applies to a directory of images, not to an .npz/.npy file: drop it")
    try:
        if path.suffix.lower() == ".npy":
            arrays = {"arr_0": np.load(path, allow_pickle=False, mmap_mode="r")}
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read calibration data '{path}' ({first_line(exc)}): "
                        "give an .npz or .npy file written by numpy") from None
    if path.suffix.lower() == ".npy" and len(specs) != 1:
        raise DataError(f"'{path}' is one array but the model has inputs {[s.name for s in specs]}: "
                        "give an .npz with one array per input")
    return _from_arrays(arrays, specs)


def _from_arrays(arrays: dict, specs: list[InputSpec]) -> CalibrationSet:
    arrays = dict(arrays)
    labels = arrays.pop("labels", None)
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return CalibrationSet(arrays, None if labels is None else np.asarray(labels))


def from_feeds(feeds, specs: list[InputSpec], where: str, samples: int | None = None) -> CalibrationSet:
    """Concatenate feed dicts (from an iterable or a `get_next()` reader) into one set, read once."""
    names = [s.name for s in specs]
    ranks = {s.name: len(s.shape) for s in specs}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count, held, budget = 0, 0, (available_memory() or 8 << 30) // 4
    for index, feed in enumerate(_iterate(feeds, where)):
        if not isinstance(feed, dict):
            raise DataError(f"{where}: item {index} is a {type(feed).__name__}, not a dict: "
                            f"yield {{input name: array}} dicts for the inputs {names}")
        unknown = sorted(set(feed) - set(names))
        missing = [n for n in names if n not in feed]
        if unknown or missing:
            raise DataError(f"{where}: item {index} has inputs {sorted(feed)}, the model takes {names}: "
                            "name the arrays after the model's inputs")
        arrays = {n: np.asarray(feed[n]) for n in names}
        for name, array in arrays.items():
            if array.ndim == ranks[name] - 1:  # one sample without its batch axis
                array = array[None]
            if array.ndim != ranks[name]:
                raise DataError(f"{where}: item {index}, input '{name}' has rank {array.ndim}, the model expects "
                                f"rank {ranks[name]} (or {ranks[name] - 1} for a single sample)")
            if parts[name] and array.shape[1:] != parts[name][0].shape[1:]:
                raise DataError(f"{where}: item {index}, input '{name}' has shape {list(array.shape)} after items "
                                f"of shape {list(parts[name][0].shape)}: give every sample the same shape")
            parts[name].append(array)
        sizes = {len(parts[n][-1]) for n in names}
        if len(sizes) != 1:
            raise DataError(f"{where}: item {index} gives the inputs different batch sizes {sorted(sizes)}: "
                            "give each input the same number of samples")
        count += sizes.pop()
        held += sum(parts[n][-1].nbytes for n in names)
        if samples is not None and count >= samples:
            break
        if samples is None and (count > MAX_FEED_SAMPLES or held > budget):
            raise DataError(f"{where} gave {count} samples ({held / 2**20:.0f} MB) and is still going: it may never "
                            "end; read only the first N with --calib-samples N")
    if count == 0:
        raise DataError(f"{where} holds no samples: give at least one sample per input")
    return CalibrationSet({n: np.concatenate(parts[n]) for n in names})


def _iterate(feeds, where: str):
    """Items of an iterable, or of a reader's `get_next()` until it returns None."""
    try:
        if hasattr(feeds, "get_next"):
            while (feed := feeds.get_next()) is not None:
                yield feed
        else:
            yield from feeds
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report its failure on one line
        raise DataError(f"{where} failed while producing samples ({_first_line(exc)}): fix the data loader") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def is_loader_script(text: str) -> bool:
    head, sep, func = text.rpartition(":")
    return bool(sep) and head.endswith(".py") and func.isidentifier()


def run_loader_script(text: str):
    """Import `file.py` and call its `function()`; it returns feed dicts (an iterable or a reader)."""
    head, _, func_name = text.rpartition(":")
    path = Path(head)
    if not head.endswith(".py") or not func_name.isidentifier():
        raise UsageError(f"--data-loader-script '{text}': give it as file.py:function")
    if not path.is_file():
        raise DataError(f"data loader script '{path}' does not exist: check the --data-loader-script path")
    spec = importlib.util.spec_from_file_location(f"onnxprune_loader_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code
        raise DataError(f"data loader script '{path}' failed to import ({_first_line(exc)}): fix the script") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"data loader script '{path}' has no function '{func_name}': "
                        f"define it, or name the right one after the ':'")
    try:
        return func()
    except Exception as exc:  # noqa: BLE001 - user code
        raise DataError(f"{path}:{func_name}() failed ({_first_line(exc)}): fix the data loader") from None


def check(calibration: CalibrationSet, specs: list[InputSpec], where: str) -> CalibrationSet:
    """Names, ranks, dims, dtypes and finiteness against the model, each with a one-line fix.

    Returns the set with arrays cast to the model's dtypes where that is lossless in kind (a new set when
    anything was cast: the given one is never modified)."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in calibration.arrays]
    if missing:
        raise DataError(f"{where} has no array for input '{missing[0]}' (it has {sorted(calibration.arrays)}): "
                        f"name the arrays after the model's inputs {names}")
    extra = sorted(set(calibration.arrays) - set(names))
    if extra:
        raise DataError(f"{where} has array(s) {extra} that match no model input {names}: rename or remove them")
    counts = {len(calibration.arrays[n]) if calibration.arrays[n].ndim else 0 for n in names}
    if counts == {0}:
        raise DataError(f"{where} holds no samples: give at least one sample per input")
    if len(counts) != 1:
        raise DataError(f"{where}: inputs have different sample counts {sorted(counts)}: give each input the same number")
    arrays = dict(calibration.arrays)
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise DataError(f"{where}: input '{spec.name}' has rank {array.ndim}, the model expects rank "
                            f"{len(spec.shape)} (shape {spec.shape}, samples stacked on axis 0)")
        for axis, (got, want) in enumerate(zip(array.shape[1:], spec.dims[1:]), start=1):
            if want is not None and got != want:
                raise DataError(f"{where}: input '{spec.name}' has size {got} on axis {axis}, the model expects {want}")
        if array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise DataError(f"{where}: input '{spec.name}' is {array.dtype}, the model expects {spec.dtype}: convert it")
            arrays[spec.name] = array.astype(spec.dtype)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(f"{where}: input '{spec.name}' contains NaN or Inf values: clean the data")
    if calibration.labels is not None and len(calibration.labels) != calibration.count:
        raise DataError(f"{where}: 'labels' has {len(calibration.labels)} entries for {calibration.count} samples: "
                        "give one label per sample")
    if all(arrays[n] is calibration.arrays[n] for n in names):
        return calibration
    return CalibrationSet(arrays, calibration.labels, calibration.source)


def synthetic(specs: list[InputSpec], count: int, seed: int) -> CalibrationSet:
    """Seeded inputs when no data is given: normal floats, small token ids, all-ones masks."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = [count] + list(spec.shape[1:])
        name = spec.name.lower()
        if np.issubdtype(spec.dtype, np.floating):
            values = rng.standard_normal(shape)
        elif spec.dtype == np.bool_:
            values = rng.random(shape) < 0.5
        elif "mask" in name:
            values = np.ones(shape)
        elif "type" in name or "segment" in name or "position" in name:
            values = np.zeros(shape)
        else:
            values = rng.integers(0, 100, size=shape)
        arrays[spec.name] = np.asarray(values).astype(spec.dtype)
    return CalibrationSet(arrays, source="synthetic")
