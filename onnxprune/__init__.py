"""onnxprune: structured pruning of ONNX graphs, on the deployed artifact itself."""

from .config import PruneConfig
from .errors import OnnxPruneError
from .pipeline import PruneResult, prune
from .version import __version__
from .workflows import factorize, inspect

__all__ = ["__version__", "OnnxPruneError", "PruneConfig", "PruneResult", "factorize", "inspect", "prune"]
