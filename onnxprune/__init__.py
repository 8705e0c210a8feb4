"""onnxprune: structured pruning of ONNX graphs, on the deployed artifact itself."""

__version__ = "0.1.0"

from .errors import OnnxPruneError  # noqa: E402
from .pipeline import PruneConfig, PruneResult, factorize, inspect, prune  # noqa: E402

__all__ = ["__version__", "OnnxPruneError", "PruneConfig", "PruneResult", "factorize", "inspect", "prune"]
