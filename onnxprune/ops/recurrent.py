"""Recurrent layers: LSTM, GRU, RNN (layout 0: X [steps, batch, features], Y [steps, directions, batch,
hidden]).

The input features are consumed by W's columns. The hidden units are a source: unit j is row j of every
gate block of W, R and B, column j of R (the recurrence), entry j of the initial states and peepholes,
and channel j of Y, Y_h and Y_c. Both directions of a bidirectional layer share `hidden_size`, so unit
j is removed from both (Y carries the same ids in each direction).
"""

from __future__ import annotations

import numpy as np

from .base import Handler, attr, const_input, has_input, register

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
WEIGHTS = (1, 2, 3)  # W, R, B
STATES = (5, 6)  # initial_h, initial_c
PEEPHOLES = 7


@register("LSTM", "GRU", "RNN")
class RecurrentHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        reason = self._refusal(node)
        if reason is not None:
            ctx.block_inputs(node, f"{node.op}: {reason}")
            return
        if x is not None and x.axis != 2:
            ctx.block(x.ids, f"{node.op} '{node.name}': channels arrive on axis {x.axis}, not the features")
        outputs = [(i, out) for i, out in enumerate(node.outputs) if out.name]
        if not outputs:
            return
        hidden = int(attr(node, "hidden_size"))
        first, tensor = outputs[0]
        ids = ctx.new_source(node, tensor, hidden, axis=3 if first == 0 else 2)
        cmap = ctx.channels(tensor)
        for i, out in outputs[1:]:  # Y_h and Y_c: [directions, batch, hidden]
            ctx.set(out, type(cmap)(3 if i == 0 else 2, ids))
        if any(has_input(node, i) and const_input(node, i) is None for i in STATES):
            ctx.block(ids, f"{node.op} '{node.name}': its initial state is not a constant (a model input or computed)")

    @staticmethod
    def _refusal(node) -> str | None:
        if attr(node, "layout", 0) != 0:
            return "batch-first layout (layout=1) is not supported"
        if any(has_input(node, i) and const_input(node, i) is None for i in (*WEIGHTS, PEEPHOLES)):
            return "weights are not constants"
        return None

    def rewrite(self, node, rw):
        gates = GATES[node.op]
        x_mask = rw.mask(node.inputs[0])
        hidden_mask = rw.mask(next(t for t in node.outputs if t.name))
        keep = np.ones(int(attr(node, "hidden_size")), dtype=bool) if hidden_mask is None else hidden_mask
        rows = np.tile(keep, gates)
        weight = node.inputs[1].values[:, rows]
        rw.set_input(node, 1, weight if x_mask is None else weight[:, :, x_mask])
        if hidden_mask is None:
            return
        rw.set_input(node, 2, node.inputs[2].values[:, rows][:, :, keep])
        if has_input(node, 3):
            rw.set_input(node, 3, node.inputs[3].values[:, np.tile(keep, 2 * gates)])
        for i in STATES:
            if has_input(node, i):
                rw.set_input(node, i, node.inputs[i].values[..., keep])
        if has_input(node, PEEPHOLES):
            rw.set_input(node, PEEPHOLES, node.inputs[PEEPHOLES].values[:, np.tile(keep, 3)])
        rw.set_attr(node, "hidden_size", int(keep.sum()))

    def timing_sides(self, node):
        """X [steps, batch, features] -> hidden units; the recurrence multiplies units by units."""
        if self._refusal(node) is not None:
            return None
        return 2, int(node.inputs[1].values.shape[2]), int(attr(node, "hidden_size")), "recurrent"

    def cost_parts(self, node):
        """The input product scales with the features and the units, the recurrent one with the units twice."""
        w, r = (node.inputs[i].values.size for i in (1, 2))
        y = next(t for t in node.outputs if t.name)
        return [(w / (w + r), node.inputs[0], y), (r / (w + r), y, y)]

    def filter_weights(self, node):
        """Per hidden unit: its rows of every gate of W and R, both directions."""
        gates, hidden = GATES[node.op], int(attr(node, "hidden_size"))
        parts = [node.inputs[i].values for i in (1, 2)]
        return np.concatenate([w.reshape(w.shape[0], gates, hidden, -1).transpose(2, 0, 1, 3).reshape(hidden, -1)
                               for w in parts], axis=1)
