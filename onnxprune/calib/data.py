"""Calibration sets: named input arrays (plus optional labels), checked against the model's inputs."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import DataError
from ..io import graph_inputs


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # declared dims: int, or None where dynamic
    shape: list[int]  # the static shape used for analysis

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims and self.dims[0] is not None else None


def input_specs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> list[InputSpec]:
    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims, list(shapes[value.name])))
    return specs


class CalibrationSet:
    """Samples for every model input, stacked on axis 0; `labels` when the data came with them."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None, source: str = "calibration"):
        self.arrays = arrays
        self.labels = labels
        self.source = source  # "calibration" or "synthetic"

    @property
    def count(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int):
        """Feed dicts of at most `batch_size` samples, in order."""
        for start in range(0, self.count, batch_size):
            yield {name: a[start:start + batch_size] for name, a in self.arrays.items()}

    def head(self, count: int) -> "CalibrationSet":
        labels = None if self.labels is None else self.labels[:count]
        return CalibrationSet({k: v[:count] for k, v in self.arrays.items()}, labels, self.source)


def load_calibration(path: str | Path, specs: list[InputSpec]) -> CalibrationSet:
    """Read an .npz (arrays named after the inputs, optional `labels`) or .npy (single-input model)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data '{path}' does not exist: check the --calib path")
    try:
        if path.suffix == ".npy":
            arrays = {"arr_0": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read calibration data '{path}' ({exc}): give an .npz or .npy file") from None
    labels = arrays.pop("labels", None)
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    calibration = CalibrationSet(arrays, labels)
    check(calibration, specs, str(path))
    return calibration


def check(calibration: CalibrationSet, specs: list[InputSpec], where: str) -> None:
    """Names, ranks, dims, dtypes and finiteness against the model, each with a one-line fix."""
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
    for spec in specs:
        array = calibration.arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise DataError(f"{where}: input '{spec.name}' has rank {array.ndim}, the model expects rank "
                            f"{len(spec.shape)} (shape {spec.shape}, samples stacked on axis 0)")
        for axis, (got, want) in enumerate(zip(array.shape[1:], spec.dims[1:]), start=1):
            if want is not None and got != want:
                raise DataError(f"{where}: input '{spec.name}' has size {got} on axis {axis}, the model expects {want}")
        if array.dtype != spec.dtype:
            if np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                calibration.arrays[spec.name] = array.astype(spec.dtype)
            else:
                raise DataError(f"{where}: input '{spec.name}' is {array.dtype}, the model expects {spec.dtype}: convert it")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(f"{where}: input '{spec.name}' contains NaN or Inf values: clean the data")
    if calibration.labels is not None and len(calibration.labels) != calibration.count:
        raise DataError(f"{where}: 'labels' has {len(calibration.labels)} entries for {calibration.count} samples")


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
