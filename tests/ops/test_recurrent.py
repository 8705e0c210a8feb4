"""Recurrent layers (LSTM, GRU, RNN): no handler, so their channels are blocked; the cost model counts
the input and recurrent matrix products of every step."""

from __future__ import annotations

import pytest
from onnx import helper

from onnxprune.validate.cost import node_macs


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_a_recurrent_layer_costs_its_input_and_recurrent_products_per_step(op, gates):
    steps, batch, features, hidden = 5, 2, 4, 8
    shapes = {"x": (steps, batch, features), "w": (1, gates * hidden, features), "r": (1, gates * hidden, hidden),
              "y": (steps, 1, batch, hidden)}
    node = helper.make_node(op, ["x", "w", "r"], ["y"], hidden_size=hidden)
    per_step = gates * hidden * features + gates * hidden * hidden
    assert node_macs(node, shapes, {}) == steps * batch * per_step
