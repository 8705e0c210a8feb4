"""Einsum with a constant 2-D operand in a matrix-product spelling: pruned like a MatMul; its weight
layout against onnxruntime, its cost, and the equations it leaves alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnxprune.ops.einsum import weight_in_axis
from onnxprune.validate.cost import node_macs
from tests.builders import Builder
from tests.oracle import family_tests
from tests.ops.weighted import check_weight_layout

OPSET = 12  # Einsum's first version


def einsum_mlp(seed: int = 0):
    """x [1, 5, 16] -> Einsum("bsk,kn->bsn", W1[16, 32]) -> Relu -> Einsum("...k,nk->...n", W2[8, 32]).

    Prunable: the hidden 32 channels (W1 columns, W2 columns).
    """
    b = Builder(seed, opset=OPSET)
    h = b.node("Einsum", "fc1", ["x", b.randn("fc1.weight", [16, 32], 0.25)], equation="bsk,kn->bsn")
    h = b.relu("relu1", h)
    b.output(b.node("Einsum", "fc2", [h, b.randn("fc2.weight", [8, 32], 1 / math.sqrt(32))],
                    equation="...k,nk->...n"))
    return b.model([("x", [1, 5, 16])], name="einsum_mlp")


BUILDERS = {"einsum_mlp": einsum_mlp}
BLOCKED: dict[str, str] = {}

test_pruning_dead_channels_is_exact, test_blocked_patterns_are_left_whole_with_a_reason = \
    family_tests(BUILDERS, BLOCKED)


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_weight_layout_reproduces_the_einsum(name):
    check_weight_layout(einsum_mlp(), name)


@pytest.mark.parametrize("equation,in_axis", [
    ("bsk,kn->bsn", 0), ("...k,nk->...n", 1), ("ij,jk->ik", 0), (b"ij, kj -> ik", 1),
    ("nchw,oc->nohw", None), ("bij,jk->bki", None), ("ii,ij->ij", None), ("ij,jj->ij", None), ("ij->ji", None),
    ("bij,bjk->bik", None), ("ij,jk", None),
])
def test_only_matrix_products_over_the_last_axis_have_a_weight_layout(equation, in_axis):
    assert weight_in_axis(equation) == in_axis


def test_einsum_macs_are_output_elements_times_features():
    shapes = {"x": (2, 5, 16), "w": (16, 8), "y": (2, 5, 8)}
    node = helper.make_node("Einsum", ["x", "w"], ["y"], equation="bsk,kn->bsn")
    assert node_macs(node, shapes, {}) == 2 * 5 * 8 * 16
    shapes = {"x": (1, 8, 4, 4), "w": (4, 8), "y": (1, 4, 4, 4)}  # another contraction: one per output
    assert node_macs(helper.make_node("Einsum", ["x", "w"], ["y"], equation="nchw,oc->nohw"), shapes, {}) == 64


def test_pfp_scoring_and_recovery_treat_the_einsum_as_a_layer(tmp_path):
    from onnxprune import PruneConfig, prune

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 5, 16)).astype(np.float32))
    result = prune(einsum_mlp(), PruneConfig(filters=0.5, scorer="pfp", calibration=calib))
    (layer,) = result.report["recovery"]["layers"]
    assert (layer["name"], layer["status"]) == ("fc2", "recovered")
    assert layer["error_after"] < layer["error_before"]
    assert result.report["after"]["macs"] == 5 * 16 * 16 + 5 * 16 + 5 * 8 * 16  # fc1, relu1, fc2 at 16 channels
