"""DepthToSpace (torch's PixelShuffle is mode CRD; DCR as ONNX defines it) and SpaceToDepth: each output
channel of DepthToSpace reads r*r input channels (blocksize r), one unit kept or removed whole; SpaceToDepth
copies each input channel to r*r output channels."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import PruneConfig, inspect, prune
from tests.builders import Builder, run, x_input
from tests.oracle import assert_exact_on, family_tests


def pixel_shuffle(seed: int = 0, mode: str = "CRD", batch=1, r: int = 2) -> onnx.ModelProto:
    """x [batch,16,8,8] -> conv1(16->4*r*r) -> DepthToSpace(r, mode) -> Relu -> conv2(4->8).

    Prunable: conv1's 4*r*r channels in 4 units of r*r (one per output channel)."""
    b = Builder(seed)
    h = b.node("DepthToSpace", "shuffle", [b.conv("conv1", "x", 16, 4 * r * r)], blocksize=r, mode=mode)
    b.output(b.conv("conv2", b.relu("relu1", h), 4, 8))
    return b.model(x_input([batch, 16, 8, 8]), name=f"pixel_shuffle_{mode.lower()}")


def space_to_depth(seed: int = 0) -> onnx.ModelProto:
    """x [1,3,8,8] -> conv1(3->8) -> Relu -> SpaceToDepth(2) -> conv2(32->8). Prunable: conv1's 8 channels,
    each read by conv2 at 4 input positions."""
    b = Builder(seed)
    h = b.node("SpaceToDepth", "unshuffle", [b.relu("relu1", b.conv("conv1", "x", 3, 8))], blocksize=2)
    b.output(b.conv("conv2", h, 32, 8))
    return b.model(x_input([1, 3, 8, 8]), name="space_to_depth")


def blocked_channels_last(seed: int = 0) -> onnx.ModelProto:
    """x [1,4,4,3] -> fc1(3->16) -> DepthToSpace(2) on [1, 4, 4, 16] -> [1, 1, 8, 32] -> fc2(32->8): the
    channels are on the last axis, which DepthToSpace spreads over its blocks' columns. Blocked."""
    b = Builder(seed)
    h = b.node("DepthToSpace", "shuffle", [b.matmul("fc1", "x", 3, 16)], blocksize=2, mode="CRD")
    b.output(b.matmul("fc2", h, 32, 8))
    return b.model([("x", [1, 4, 4, 3])], name="blocked_channels_last")


BUILDERS = {
    "pixel_shuffle_crd": pixel_shuffle,
    "pixel_shuffle_dcr": lambda seed=0: pixel_shuffle(seed, mode="DCR"),
    "pixel_shuffle_crd_r3": lambda seed=0: pixel_shuffle(seed, r=3),
    "space_to_depth": space_to_depth,
    "blocked_channels_last": blocked_channels_last,
}
BLOCKED = {"blocked_channels_last": "DepthToSpace 'shuffle': channels arrive on axis 3, not 1"}

test_pruning_dead_channels_is_exact, test_near_misses_are_left_whole_with_a_reason = family_tests(BUILDERS, BLOCKED)


def _units(model: onnx.ModelProto) -> dict[str, tuple[int, bool]]:
    return {g["name"]: (g["channels"], g["prunable"]) for g in inspect(model)["groups"]}


def test_each_output_channel_of_depth_to_space_is_one_unit_of_its_input():
    assert _units(pixel_shuffle()) == {"conv1": (4, True), "conv2": (8, False)}
    assert _units(space_to_depth())["conv1"] == (8, True)


def _kept_filters(model: onnx.ModelProto, pruned: onnx.ModelProto, name: str) -> list[int]:
    """The original positions of the filters a pruned conv keeps, found by their (distinct) biases."""
    before, after = (next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)
                     for m in (model, pruned))
    return [int(np.flatnonzero(before == value)[0]) for value in after]


def test_crd_keeps_whole_blocks_of_r_squared_and_dcr_every_c_th():
    """conv1's kept filters: CRD keeps output channel c as filters 4c..4c+3, DCR as c, c+4, c+8, c+12."""
    for mode in ("CRD", "DCR"):
        model = pixel_shuffle(mode=mode)
        kept = _kept_filters(model, prune(model, PruneConfig(filters=0.5, scorer="l1")).model, "conv1.bias")
        channels = sorted({k // 4 if mode == "CRD" else k % 4 for k in kept})
        assert len(channels) == 2
        blocks = [4 * c + i for c in channels for i in range(4)] if mode == "CRD" else \
            [c + 4 * i for i in range(4) for c in channels]
        assert kept == blocks


def test_a_dynamic_batch_export_prunes_and_runs_at_batch_3():
    model = pixel_shuffle(batch="N")
    feed = {"x": np.random.default_rng(3).standard_normal((3, 16, 8, 8)).astype(np.float32)}
    assert run(assert_exact_on(model, feed, seed=1).model, feed)[0].shape == (3, 8, 16, 16)
    assert run(prune(model, PruneConfig(filters=0.5, scorer="l1")).model, feed)[0].shape == (3, 8, 16, 16)
