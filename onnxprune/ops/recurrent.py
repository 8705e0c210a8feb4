"""Recurrent layers: LSTM, GRU, RNN (layout 0: X [steps, batch, features], Y [steps, directions, batch,
hidden]).

The input features are consumed by W's columns. The hidden units are a source: unit j is row j of every
gate block of W, R and B, column j of R (the recurrence), entry j of the initial states and peepholes,
and channel j of Y, Y_h and Y_c. Both directions of a bidirectional layer share `hidden_size`, so unit
j is removed from both (Y carries the same ids in each direction).

A streaming model passes the state in and out (the voice-activity model: initial_h, initial_c are model
inputs, Y_h, Y_c graph outputs); its interface keeps the full width: a computed initial state is
gathered to the kept units, and a final state that is a graph output is scattered back to `hidden_size`
with zeros at the removed units (which the gathered input then ignores).

Weight layout (for the scorers and recovery): W as the matrix [features, directions x gates x hidden]
applied to every (step, batch) row of X; the product is the gates' input part, not the op's output
(`WeightLayout.product_output` False). Rows are ordered batch item first, then step.
"""

from __future__ import annotations

import numpy as np

from .base import Handler, WeightLayout, attr, const_input, has_input, register

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
        outputs = tracked_outputs(node, {t.name for t in ctx.graph.outputs})
        if not outputs:
            return
        hidden = int(attr(node, "hidden_size"))
        first, tensor = outputs[0]
        ids = ctx.new_source(node, tensor, hidden, axis=3 if first == 0 else 2)
        cmap = ctx.channels(tensor)
        for i, out in outputs[1:]:  # Y_h and Y_c: [directions, batch, hidden]
            ctx.set(out, type(cmap)(3 if i == 0 else 2, ids))

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
        hidden_mask = next((rw.mask(t) for t in node.outputs if rw.mask(t) is not None), None)
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
            if has_input(node, i) and const_input(node, i) is not None:
                rw.set_input(node, i, node.inputs[i].values[..., keep])
            elif has_input(node, i):
                node.inputs[i] = rw.add_node("Gather", [node.inputs[i], np.flatnonzero(keep)], axis=2)
        for out in node.outputs[1:]:
            if out.name and rw.mask(out) is None:
                _widen_state(node, out, keep, rw)
        if has_input(node, PEEPHOLES):
            rw.set_input(node, PEEPHOLES, node.inputs[PEEPHOLES].values[:, np.tile(keep, 3)])
        rw.set_attr(node, "hidden_size", int(keep.sum()))

    def weight_layout(self, op, attrs, weight_shape):
        if len(weight_shape) != 3:
            return None
        directions, rows, features = weight_shape
        return WeightLayout(op, weight_shape, features, directions * rows, in_axis=2, out_axis=1, data_axis=2,
                            bias_input=3, product_output=False)

    def bias_offset(self, layout, values):
        """B is [directions, W's bias then R's]: both add to the gate inputs."""
        input_bias, recurrent_bias = np.split(values.reshape(layout.shape[0], 2, -1), 2, axis=1)
        return (input_bias + recurrent_bias).reshape(-1)

    def with_bias_offset(self, layout, values, offset):
        """W's bias takes the offset less R's (kept)."""
        offset = offset.reshape(layout.shape[0], 1, -1)
        recurrent_bias = np.zeros_like(offset) if values is None else values.reshape(layout.shape[0], 2, -1)[:, 1:]
        return np.concatenate([offset - recurrent_bias, recurrent_bias], axis=1).reshape(layout.shape[0], -1)

    def product_mask(self, layout, keep):
        """Kept columns of the product: the kept units' rows of every gate, in each direction."""
        return np.tile(keep, layout.shape[0] * GATES[layout.op])

    def to_matrix(self, layout, weight):
        return weight.reshape(-1, layout.in_channels).T[None]

    def from_matrix(self, layout, matrix):
        return matrix[0].T.reshape(layout.shape)

    def input_factors(self, layout, factors):
        return factors[None, None, :]

    def input_rows(self, layout, attrs, x, out_shape, rows):
        return x.transpose(1, 0, 2).reshape(-1, x.shape[2])[rows][:, None, :]

    def rows(self, layout, out_shape):
        """Rows of the product [batch x steps, outputs] (`product_output` False: not the op's output)."""
        return int(np.prod(out_shape[:-1], dtype=np.int64))

    def output_rows(self, layout, y, rows):
        return y.reshape(-1, y.shape[-1])[rows]

    def positions(self, layout, x_shape):
        """Rows per batch item: the steps of X [steps, batch, features]."""
        return int(x_shape[0])

    def timing_sides(self, node):
        """X [steps, batch, features] -> hidden units; the recurrence multiplies units by units."""
        if self._refusal(node) is not None:
            return None
        return 2, int(node.inputs[1].values.shape[2]), int(attr(node, "hidden_size")), "recurrent", 1

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


def tracked_outputs(node, graph_outputs: set[str]) -> list:
    """(index, tensor) of the outputs that carry the hidden units: Y, and Y_h, Y_c unless they are graph
    outputs while another output carries the units (a streaming state: widened back, see `_widen_state`)."""
    named = [(i, out) for i, out in enumerate(node.outputs) if out.name]
    inside = [(i, out) for i, out in named if i == 0 or out.name not in graph_outputs]
    return inside or named


def _widen_state(node, out, keep: np.ndarray, rw) -> None:
    """Make final state `out` [directions, batch, hidden] full width again: the kept units in their
    places, zeros at the removed ones (a zero pad slot gathered to them)."""
    kept = rw.new_tensor(f"{out.name}_kept")
    node.outputs[node.outputs.index(out)] = kept
    padded = rw.add_node("Pad", [kept, np.array([0, 0, 0, 0, 0, 1], dtype=np.int64)])
    index = np.where(keep, np.cumsum(keep) - 1, int(keep.sum()))
    rw.add_node("Gather", [padded, index.astype(np.int64)], output=out, axis=2)
