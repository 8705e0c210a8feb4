"""Op handlers: the only place that knows what an ONNX op does to channels.

A handler answers, for one node, how channels cross it (`propagate`), how to slice the node when some
channels go (`rewrite`), and, for layers that create channels, their filters (`filter_weights`). A
weighted op's handler also gives its weight layout (`weight_layout` and the methods after it in
`base.Handler`), which scoring, recovery, low-rank, the cost model and the test oracle use.
Register one with `@register("OpType", ...)` in a module of this package (every module is imported);
an op without a handler blocks the channels reaching it.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Handler, WeightLayout, handler_for, register, registered_ops, weighted, weighted_ops

for _module in pkgutil.iter_modules(__path__):  # every handler module registers its ops on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Handler", "WeightLayout", "register", "handler_for", "registered_ops", "weighted", "weighted_ops"]
