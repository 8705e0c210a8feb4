"""Recovery after pruning: closed-form re-fitting from calibration data (`bias`, `lstsq`), and
onnxruntime training artifacts for real fine-tuning (`training`, imported on demand because it needs
the separate onnxruntime-training package)."""

from .passes import METHODS, recover

__all__ = ["METHODS", "recover"]
