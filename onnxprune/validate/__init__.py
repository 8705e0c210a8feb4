"""Read-only checks of a result: the ONNX checker, onnxruntime outputs against the original, cost."""

from .cost import model_cost
from .compare import fidelity, run_model
from .checker import check_model

__all__ = ["model_cost", "fidelity", "run_model", "check_model"]
