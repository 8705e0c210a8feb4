"""Read-only checks of a result: the ONNX checker, onnxruntime outputs against the original, cost."""

from .cost import model_cost
from .compare import fidelity, run_model
from .runtime import check_model, session

__all__ = ["model_cost", "fidelity", "run_model", "check_model", "session"]
