"""A residual stream blocked because no layer's channels reach it (ConvNeXt's and Swin's stage-1 blocks, a
transformer's residual Adds): the reason suggests --hidden where a norm it lets the stream through (or an
embedding table it makes the stream's source) is above the operand, and says nothing of it elsewhere."""

import json

import numpy as np
from click.testing import CliRunner

from onnxprune.cli import main
from tests.builders import Builder, x_input

WIDTH = 16


def _channels_last_norm(b: Builder, name: str, x: str) -> str:
    """LayerNorm over the channels of an NCHW tensor, as torch exports ConvNeXt's: NHWC, LayerNorm, back."""
    h = b.node("Transpose", f"{name}.nhwc", [x], perm=[0, 2, 3, 1])
    h = b.node("LayerNormalization", name, [h, b.const(f"{name}.scale", np.ones(WIDTH)),
                                            b.const(f"{name}.bias", np.zeros(WIDTH))], axis=-1, epsilon=1e-6)
    return b.node("Transpose", f"{name}.nchw", [h], perm=[0, 3, 1, 2])


def convnext(blocks: int = 2, seed: int = 0):
    """x [1,3,32,32] -> stem (4x4 stride 4, 3->16) -> LayerNorm -> `blocks` x (depthwise 7x7, LayerNorm,
    fc1 16->64, Relu, fc2 64->16, layer scale, residual Add) -> LayerNorm -> down (2x2 stride 2, 16->32)."""
    b = Builder(seed)
    h = _channels_last_norm(b, "stem.norm", b.conv("stem", "x", 3, WIDTH, k=4, stride=4, pad=0))
    for i in range(blocks):
        t = b.conv(f"b{i}.dw", h, WIDTH, WIDTH, k=7, group=WIDTH)
        t = b.node("Transpose", f"b{i}.nhwc", [t], perm=[0, 2, 3, 1])
        t = b.node("LayerNormalization", f"b{i}.norm", [t, b.const(f"b{i}.norm.scale", np.ones(WIDTH)),
                                                        b.const(f"b{i}.norm.bias", np.zeros(WIDTH))], axis=-1)
        t = b.matmul(f"b{i}.fc2", b.relu(f"b{i}.act", b.matmul(f"b{i}.fc1", t, WIDTH, 4 * WIDTH)), 4 * WIDTH, WIDTH)
        t = b.node("Mul", f"b{i}.scale", [t, b.const(f"b{i}.gamma", np.full(WIDTH, 0.5))])
        h = b.node("Add", f"b{i}.residual", [h, b.node("Transpose", f"b{i}.nchw", [t], perm=[0, 3, 1, 2])])
    b.output(b.conv("down", _channels_last_norm(b, "down.norm", h), WIDTH, 2 * WIDTH, k=2, stride=2, pad=0))
    return b.model(x_input([1, 3, 32, 32]), [("y", [1, 2 * WIDTH, 4, 4])], name="convnext")


def residual_from_input():
    """x -> conv (3->16) -> Add(conv, z) with z a model input -> conv2: nothing above z --hidden would change."""
    b = Builder(0)
    h = b.node("Add", "residual", [b.conv("conv", "x", 3, WIDTH), "z"])
    b.output(b.conv("conv2", h, WIDTH, 4))
    return b.model(x_input() + [("z", [1, WIDTH, 16, 16])], [("y", [1, 4, 16, 16])], name="residual_from_input")


def inspect_json(tmp_path, model, *args) -> dict:
    path = tmp_path / f"{model.graph.name}.onnx"
    path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(main, ["inspect", str(path), "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def group_of(info: dict, source: str) -> dict:
    return next(g for g in info["groups"] if source in g["sources"])


def test_a_stage_one_block_blocked_by_the_residual_stream_suggests_hidden(tmp_path):
    for block in ("b0", "b1"):
        (reason,) = group_of(inspect_json(tmp_path, convnext()), f"{block}.fc2")["reasons"]
        assert f"Add '{block}.residual'" in reason and "computed" in reason
        assert "LayerNormalization 'stem.norm'" in reason and "try --hidden" in reason


def test_with_hidden_the_blocks_it_suggested_it_for_are_pruned_with_the_stream(tmp_path):
    stream = group_of(inspect_json(tmp_path, convnext(), "--hidden"), "b0.fc2")
    assert stream["prunable"] and {"stem", "b0.fc2", "b1.fc2"} <= set(stream["sources"])


def test_the_table_shows_the_suggestion(tmp_path):
    path = tmp_path / "convnext.onnx"
    path.write_bytes(convnext().SerializeToString())
    output = CliRunner().invoke(main, ["inspect", str(path)], catch_exceptions=False).output
    line = next(line for line in output.splitlines() if line.startswith("b0.fc2"))
    assert "blocked" in line and "--hidden" in line


def test_no_suggestion_where_hidden_would_not_help(tmp_path):
    (reason,) = group_of(inspect_json(tmp_path, residual_from_input()), "conv")["reasons"]
    assert "operand 'z'" in reason and "--hidden" not in reason


def residual_of_a_norm_over_the_width():
    """conv (3->8) + LayerNorm(z) over z's last axis, its width W = 16 (not the 8 channels) -> conv2: --hidden
    would not make that operand carry the conv's channels."""
    b = Builder(0)
    norm = b.node("LayerNormalization", "norm", ["z", b.const("gamma", np.ones(16)), b.const("beta", np.zeros(16))], axis=-1)
    b.output(b.conv("conv2", b.node("Add", "residual", [b.conv("conv", "x", 3, 8), norm]), 8, 4))
    return b.model(x_input() + [("z", [1, 8, 16, 16])], [("y", [1, 4, 16, 16])], name="norm_over_width", opset=17)


def test_no_suggestion_for_a_norm_over_another_axis_than_the_channels(tmp_path):
    (reason,) = group_of(inspect_json(tmp_path, residual_of_a_norm_over_the_width()), "conv")["reasons"]
    assert "operand 'norm" in reason and "--hidden" not in reason
