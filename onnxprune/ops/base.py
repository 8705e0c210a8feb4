"""The handler registry and the helpers handlers share."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_REGISTRY: dict[str, "Handler"] = {}


class Handler:
    """Channel semantics of one op family. Subclasses override what applies to them."""

    multi_axis = False  # accepts channel maps split across several axes (see graph.ChannelMap)

    def propagate(self, node: gs.Node, ctx) -> None:
        """Read input channel maps from `ctx`; set output maps, join, block or create sources."""
        raise NotImplementedError

    def rewrite(self, node: gs.Node, rw) -> None:
        """Slice the node for the kept channels: `rw.mask(tensor)` is None or a keep mask."""

    def filter_weights(self, node: gs.Node) -> np.ndarray | None:
        """For a source: its weights as [output channels, fan-in], output-major."""
        return None

    def channel_scales(self, node: gs.Node) -> np.ndarray | None:
        """For a normalisation layer: its per-channel scale (BN gamma), for the `bn` scorer."""
        return None


def register(*op_types: str):
    def decorate(cls):
        instance = cls()
        for op in op_types:
            _REGISTRY[op] = instance
        return cls

    return decorate


def handler_for(op_type: str) -> Handler | None:
    return _REGISTRY.get(op_type)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------- helpers


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def const_input(node: gs.Node, index: int) -> np.ndarray | None:
    """Value of input `index` when it is a constant, else None (also when absent)."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def has_input(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index].name != ""


def pass_through(node: gs.Node, ctx, input_index: int = 0, outputs=(0,)) -> None:
    """Outputs carry the channels of one input unchanged (activations, Identity, pooling, ...)."""
    cmap = ctx.channels(node.inputs[input_index])
    if cmap is None:
        return
    for o in outputs:
        if o < len(node.outputs) and node.outputs[o].name:
            ctx.set(node.outputs[o], cmap)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
