"""Op handlers: the only place that knows what an ONNX op does to channels.

A handler answers, for one node, how channels cross it (`propagate`), how to slice the node when some
channels go (`rewrite`), and, for layers that create channels, their filters (`filter_weights`).
Register one with `@register("OpType", ...)`; an op without a handler blocks the channels reaching it.
"""

from __future__ import annotations

from .base import Handler, register, handler_for, registered_ops

from . import conv, linear, norm, elementwise, layout, spatial  # noqa: E402,F401  (registration)

__all__ = ["Handler", "register", "handler_for", "registered_ops"]
