"""Calibration data: read once into a `CalibrationSet` that can be iterated in batches many times."""

from .data import CalibrationSet, InputSpec, fixed_batch, input_specs, load_calibration, synthetic

__all__ = ["CalibrationSet", "InputSpec", "fixed_batch", "input_specs", "load_calibration", "synthetic"]
