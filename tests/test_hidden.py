"""The hidden size (a transformer's residual width) as an opt-in (`--hidden`, `PruneConfig.hidden`).

A small encoder-like builder: token ids -> embedding Gather + position table -> two blocks of
fc1 -> Relu -> fc2 (+ bias) -> residual Add -> a normalisation over the last axis -> a head, the stream
itself and a mask-weighted mean pool (`mask.unsqueeze(-1).expand(h.shape)`) as outputs. Without the option
the stream is blocked; with it the stream is one group (the table's columns, both fc2s' outputs).

What is exact: with the removed dimensions zero in every writer (the tables' columns, fc2's columns and
bias, the norm's scale and bias), pruning them leaves every output identical without a normalisation and
with an RMSNorm (its scale and epsilon are rescaled); a LayerNormalization's mean over fewer dimensions is
another, so its outputs change, and the group says so (`inexact`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from onnxprune import PruneConfig, inspect, prune
from onnxprune.cli import main
from onnxprune.loading import load
from onnxprune.plan import Plan
from onnxprune.stages import analyze_model
from tests.builders import Builder, run

VOCAB, WIDTH, FFN, SEQ = 50, 16, 32, 5
MICROSOFT = {"com.microsoft": 1}
DEAD = np.arange(WIDTH) % 3 == 1  # the dimensions the exactness tests make carry nothing


def hidden_stream(norm: str | None = "LayerNormalization", dead=None, seed: int = 0, epsilon: float | None = 1e-5):
    """ids [1,5] -> embed Gather(table[50,16]) + pos[5,16] -> 2 x (fc1 16->32, Relu, fc2 32->16 + bias,
    residual Add, `norm`) -> outputs: y = head(16->8), the stream, the masked sum over the sequence.
    `norm`: LayerNormalization, SimplifiedLayerNormalization (an RMSNorm), SkipLayerNormalization or
    SkipSimplifiedLayerNormalization (the residual Add fused in), or None. `dead`: dims zero in every writer.
    `epsilon`: the norms' attribute (None: left out, the op's default)."""
    eps = {} if epsilon is None else {"epsilon": epsilon}
    b = Builder(seed)
    alive = np.ones(WIDTH) if dead is None else (~dead).astype(float)
    h = b.node("Gather", "embed", [b.const("embed.weight", b.rng.standard_normal([VOCAB, WIDTH]) * alive), "ids"], axis=0)
    h = b.node("Add", "embed_pos", [h, b.const("pos", b.rng.standard_normal([SEQ, WIDTH]) * alive)])
    for layer in (1, 2):
        inner = b.relu(f"l{layer}.relu", b.matmul(f"l{layer}.fc1", h, WIDTH, FFN))
        weight = b.const(f"l{layer}.fc2.weight", b.rng.standard_normal([FFN, WIDTH]) / math.sqrt(FFN) * alive)
        out = b.node("MatMul", f"l{layer}.fc2", [inner, weight])
        bias = b.const(f"l{layer}.fc2.bias", 0.1 * b.rng.standard_normal(WIDTH) * alive)
        scale = b.const(f"l{layer}.norm.scale", b.rng.uniform(0.5, 1.5, WIDTH) * alive)
        shift = b.const(f"l{layer}.norm.bias", 0.1 * b.rng.standard_normal(WIDTH) * alive)
        if norm in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
            params = [scale, shift, bias] if norm == "SkipLayerNormalization" else [scale, bias]
            h = b.node(norm, f"l{layer}.norm", [out, h, *params], domain="com.microsoft", **eps)
            continue
        h = b.node("Add", f"l{layer}.residual", [b.node("Add", f"l{layer}.fc2.add", [out, bias]), h])
        if norm == "LayerNormalization":
            h = b.node(norm, f"l{layer}.norm", [h, scale, shift], axis=-1, **eps)
        elif norm == "SimplifiedLayerNormalization":
            h = b.node(norm, f"l{layer}.norm", [h, scale], axis=-1, **eps)
        elif norm == "spelled-out":  # LayerNormalization as exporters below opset 17 write it
            h = spelled_out_layer_norm(b, f"l{layer}.norm", h, scale, shift, epsilon or 1e-5)
    b.node("Identity", "stream", [h])
    mask = b.node("Unsqueeze", "mask_unsqueeze", ["mask", b.const("axes", [-1], np.int64)])
    spread = b.node("Cast", "mask_cast", [b.node("Expand", "mask_expand", [mask, b.node("Shape", "shape", [h])])],
                    to=TensorProto.FLOAT)
    b.node("ReduceSum", "pool", [b.node("Mul", "masked", [h, spread]), b.const("seq_axis", [1], np.int64)], keepdims=0)
    b.node("MatMul", "head", [h, b.randn("head.weight", [WIDTH, 8], 1 / math.sqrt(WIDTH))])
    for tensor, name in (("head_out", "y"), ("stream_out", "stream"), ("pool_out", "pooled")):
        b.output(tensor, name)
    return b.model([("ids", [1, SEQ], TensorProto.INT64), ("mask", [1, SEQ], TensorProto.INT64)],
                   outputs=[("y", [1, SEQ, 8]), ("stream", [1, SEQ, WIDTH]), ("pooled", [1, WIDTH])],
                   name=f"hidden_stream_{norm}", domains=MICROSOFT if norm and "Skip" in norm else None)


def spelled_out_layer_norm(b: Builder, name: str, x: str, scale: str, shift: str, epsilon: float) -> str:
    """(x - mean) / sqrt(mean((x - mean)^2) + epsilon) * scale + shift over the last axis, in ReduceMean, Sub,
    Pow, Add, Sqrt, Div, Mul and Add, as torch writes LayerNorm below opset 17."""
    centred = b.node("Sub", f"{name}.sub", [x, b.node("ReduceMean", f"{name}.mean", [x], axes=[-1], keepdims=1)])
    square = b.node("Pow", f"{name}.pow", [centred, b.const(f"{name}.two", np.array(2.0, np.float32))])
    variance = b.node("ReduceMean", f"{name}.variance", [square], axes=[-1], keepdims=1)
    spread = b.node("Sqrt", f"{name}.sqrt", [b.node("Add", f"{name}.eps", [variance, b.const(f"{name}.epsilon",
                                                                                               np.array(epsilon, np.float32))])])
    normed = b.node("Div", f"{name}.div", [centred, spread])
    return b.node("Add", f"{name}.plus_shift", [b.node("Mul", f"{name}.times_scale", [normed, scale]), shift])


def feed(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, VOCAB, (1, SEQ)), "mask": (rng.random((1, SEQ)) < 0.7).astype(np.int64)}


def calibration(count: int = 40) -> dict:
    """Token ids the tables hold (synthetic data would draw ids beyond them), samples stacked on the batch axis."""
    rng = np.random.default_rng(1)
    return {"ids": rng.integers(0, VOCAB, (count, SEQ)), "mask": np.ones((count, SEQ), dtype=np.int64)}


def stream_group(analysis):
    return next(g for g in analysis.groups if any(s.node.name == "embed" for s in g.sources))


def prune_dead(model):
    """The model pruned by a plan removing exactly DEAD from the stream (other groups kept whole)."""
    analysis = analyze_model(load(model), hidden=True)
    group = stream_group(analysis)
    keep = {g.index: np.arange(g.channels) for g in analysis.prunable_groups()}
    keep[group.index] = np.flatnonzero(~DEAD)
    return prune(model, PruneConfig(plan=Plan.from_keep(analysis, keep), hidden=True, calibration=calibration(8),
                                    recover="none"))


NORMS = [None, "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
         "SkipSimplifiedLayerNormalization", "spelled-out"]
CENTRED = ("LayerNormalization", "SkipLayerNormalization", "spelled-out")  # inexact under --hidden


@pytest.mark.parametrize("norm", NORMS)
def test_the_stream_is_blocked_without_the_option_and_one_prunable_group_with_it(norm):
    model = hidden_stream(norm)
    without = inspect(model)
    assert not any(g["prunable"] and g["channels"] == WIDTH for g in without["groups"])
    assert any("channel" in " ".join(g.get("reasons", [])) for g in without["groups"])
    stream = [g for g in inspect(model, hidden=True)["groups"] if "embed" in g["sources"]]
    assert len(stream) == 1 and stream[0]["prunable"], stream
    assert set(stream[0]["sources"]) == {"embed", "l1.fc2", "l2.fc2"}
    assert bool(stream[0].get("inexact")) == (norm in CENTRED)


@pytest.mark.parametrize("norm", NORMS)
def test_without_the_option_the_stream_s_blocked_reasons_point_to_it(norm):
    reasons = [r for g in inspect(hidden_stream(norm))["groups"] for r in g.get("reasons", [])
               if "computed" in r or "across the channel axis" in r]
    assert reasons and all("--hidden" in r for r in reasons), reasons


@pytest.mark.parametrize("norm", [None, "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_removing_dimensions_every_writer_zeroes_is_exact_without_a_mean_to_change(norm):
    model = hidden_stream(norm, dead=DEAD)
    result = prune_dead(model)
    inputs = feed()
    before, after = run(model, inputs), run(result.model, inputs)
    for expected, got in zip(before, after):
        assert got.shape == expected.shape  # the stream and the pool keep their width: zeros where removed
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert result.report["after"]["macs"] < result.report["before"]["macs"]


def test_an_output_also_read_inside_the_graph_keeps_its_width_and_the_readers_read_the_narrow_tensor():
    """The stream is the graph output itself (no Identity before it) and the head and the pool read it too:
    the output is widened back with zeros, the readers inside take the narrow tensor, every output exact."""
    model = hidden_stream(None, dead=DEAD)
    identity = next(n for n in model.graph.node if n.name == "stream")
    model.graph.node.remove(identity)
    next(o for o in model.graph.output if o.name == "stream").name = identity.input[0]
    result = prune_dead(model)
    before, after = run(model, feed()), run(result.model, feed())
    for expected, got in zip(before, after):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after[1][..., DEAD], 0)
    stream = identity.input[0]
    readers = [n for n in result.model.graph.node if stream in n.input]
    assert [n.op_type for n in readers] == []  # only the widening Gather writes it; nothing inside reads it
    assert sum(stream in n.output for n in result.model.graph.node) == 1


@pytest.mark.parametrize("norm, default", [("SimplifiedLayerNormalization", 1e-5),
                                           ("SkipSimplifiedLayerNormalization", 1e-12)])
def test_an_rms_norm_without_an_epsilon_gets_its_op_default_scaled(norm, default):
    result = prune_dead(hidden_stream(norm, dead=DEAD, epsilon=None))
    written = [a.f for n in result.model.graph.node if n.op_type == norm for a in n.attribute if a.name == "epsilon"]
    assert written and np.allclose(written, default * WIDTH / (WIDTH - DEAD.sum()), rtol=1e-6)


def test_a_spelled_out_layer_norm_is_pruned_as_layer_normalization_is():
    spelled, fused = (prune_dead(hidden_stream(norm, dead=DEAD)) for norm in ("spelled-out", "LayerNormalization"))
    for got, expected in zip(run(spelled.model, feed()), run(fused.model, feed())):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    widths = [{t.name: tuple(t.dims) for t in r.model.graph.initializer}["l1.fc1.weight"] for r in (spelled, fused)]
    assert widths[0] == widths[1] == (WIDTH - DEAD.sum(), FFN)  # the same dimensions removed from the stream


def test_a_mean_over_the_hidden_size_that_is_no_norm_s_statistic_still_blocks():
    b = Builder(0)
    h = b.matmul("fc", "x", WIDTH, WIDTH)
    b.node("ReduceMean", "pool", [h], axes=[-1], keepdims=0)  # not kept as size 1: a pooling, not a statistic
    model = b.model([("x", [1, SEQ, WIDTH])], outputs=[("pool_out", [1, SEQ])])
    (group,) = inspect(model, hidden=True)["groups"]
    assert not group["prunable"] and "reduces over the channel axis" in " ".join(group["reasons"])


@pytest.mark.parametrize("norm", CENTRED)
def test_a_layer_norm_over_fewer_dimensions_is_not_the_same_even_when_they_carried_nothing(norm):
    model = hidden_stream(norm, dead=DEAD)
    result = prune_dead(model)
    before, after = run(model, feed()), run(result.model, feed())
    np.testing.assert_array_equal(after[1][..., DEAD], 0)  # removed dims of the stream output are zeros
    error = np.abs(after[0] - before[0]).max() / np.abs(before[0]).max()
    assert error > 1e-3  # the mean over 11 dims is not the one over 16: the outputs change


@pytest.mark.parametrize("scorer", ["activation", "obs", "l1"])
def test_the_scorers_find_the_dimensions_that_carry_nothing_and_recovery_runs(scorer):
    """The stream's scores come from the layers reading it (fc1s, the head) or, for l1, from its writers:
    the dims every writer zeroes score lowest and are the ones removed."""
    model = hidden_stream("LayerNormalization", dead=DEAD)
    result = prune(model, PruneConfig(filters=DEAD.sum() / WIDTH, round_to=1, scorer=scorer, recover="lstsq",
                                      hidden=True, calibration=calibration()))
    group = next(g for g in result.plan.groups if "embed" in g.sources)
    assert group.keep == np.flatnonzero(~DEAD).tolist()
    stream = next(g for g in result.report["groups"] if "embed" in g["sources"])
    assert stream["channels_after"] == WIDTH - DEAD.sum() and stream["inexact"]
    assert result.report["config"]["hidden"] is True
    assert "recovery" in result.report


def test_the_cli_flag_reaches_inspect_and_prune_and_its_plan_applies_again(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(hidden_stream("SkipLayerNormalization").SerializeToString())
    np.savez(tmp_path / "calib.npz", **calibration(16))
    data = ["--calib", str(tmp_path / "calib.npz"), "--recover", "none", "--round-to", "1", "--scorer", "l1"]
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(path), "--hidden", "--json"])
    assert shown.exit_code == 0, shown.output
    assert any(g["prunable"] and g.get("inexact") for g in json.loads(shown.output)["groups"])
    assert "prunable, inexact" in runner.invoke(main, ["inspect", str(path), "--hidden"]).output
    first = runner.invoke(main, ["prune", str(path), str(tmp_path / "a.onnx"), "--filters", "0.5", "--hidden", *data,
                                 "--plan-out", str(tmp_path / "plan.json"), "--report", str(tmp_path / "r.json")])
    assert first.exit_code == 0, first.output
    assert "1 inexactly (--hidden" in first.output
    assert json.loads((tmp_path / "r.json").read_text())["config"]["hidden"] is True
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert any("embed" in g["sources"] and len(g["keep"]) < g["channels"] for g in plan["groups"]), plan
    again = runner.invoke(main, ["prune", str(path), str(tmp_path / "b.onnx"), "--hidden", *data,
                                 "--plan-in", str(tmp_path / "plan.json")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    refused = runner.invoke(main, ["prune", str(path), str(tmp_path / "c.onnx"), *data,
                                   "--plan-in", str(tmp_path / "plan.json")])
    assert refused.exit_code == 2 and not (tmp_path / "c.onnx").exists()


def embed_layer_norm(seed: int = 0):
    """onnxruntime's EmbedLayerNormalization (word, position, segment tables, gamma, beta) -> fc1 16->32 ->
    Relu -> fc2 32->16 -> SkipLayerNormalization(skip: the embedding) -> head 16->8."""
    b = Builder(seed)
    tables = [b.randn("word", [VOCAB, WIDTH]), b.randn("position", [SEQ, WIDTH]), b.randn("segment", [2, WIDTH])]
    norm = [b.const("embed.gamma", b.rng.uniform(0.5, 1.5, WIDTH)), b.randn("embed.beta", [WIDTH], 0.1)]
    h, _ = b.node("EmbedLayerNormalization", "embed", ["ids", "segments", *tables, *norm], n_out=2,
                  domain="com.microsoft", epsilon=1e-5)
    inner = b.relu("relu", b.matmul("fc1", h, WIDTH, FFN))
    params = [b.const("norm.gamma", b.rng.uniform(0.5, 1.5, WIDTH)), b.randn("norm.beta", [WIDTH], 0.1)]
    h = b.node("SkipLayerNormalization", "norm", [b.matmul("fc2", inner, FFN, WIDTH), h, *params],
               domain="com.microsoft", epsilon=1e-5)
    b.output(b.matmul("head", h, WIDTH, 8))
    return b.model([("ids", [1, SEQ], TensorProto.INT32), ("segments", [1, SEQ], TensorProto.INT32)],
                   outputs=[("y", [1, SEQ, 8])], name="embed_layer_norm", domains=MICROSOFT)


def test_embed_layer_normalization_is_the_stream_source_of_a_fused_graph():
    model = embed_layer_norm()
    assert not any(g["prunable"] and g["channels"] == WIDTH for g in inspect(model)["groups"])
    stream = next(g for g in inspect(model, hidden=True)["groups"] if "embed" in g["sources"])
    assert stream["prunable"] and stream["sources"] == ["embed", "fc2"] and len(stream["inexact"]) == 2
    rng = np.random.default_rng(0)
    data = {"ids": rng.integers(0, VOCAB, (8, SEQ)).astype(np.int32), "segments": np.zeros((8, SEQ), np.int32)}
    result = prune(model, PruneConfig(filters=0.25, round_to=1, scorer="l1", hidden=True, calibration=data,
                                      recover="none"))
    pruned = next(g for g in result.report["groups"] if "embed" in g["sources"])
    assert pruned["channels_after"] == WIDTH - 4
    word = next(t for t in result.model.graph.initializer if t.name == "word")
    assert list(word.dims) == [VOCAB, WIDTH - 4]
    assert run(result.model, {k: v[:1] for k, v in data.items()})[0].shape == (1, SEQ, 8)


def fused_attention_block(dead=None, seed: int = 0):
    """ids -> embed Gather -> onnxruntime's Attention (packed weight [16, 48], 4 heads) -> proj 16->16 with
    `dead` columns zero -> residual Add -> head 16->8 (no normalisation: the exact case)."""
    b = Builder(seed)
    alive = np.ones(WIDTH) if dead is None else (~dead).astype(float)
    h = b.node("Gather", "embed", [b.const("embed.weight", b.rng.standard_normal([VOCAB, WIDTH]) * alive), "ids"], axis=0)
    attended = b.node("Attention", "attention", [h, b.randn("qkv.weight", [WIDTH, 3 * WIDTH], 1 / math.sqrt(WIDTH)),
                                                b.randn("qkv.bias", [3 * WIDTH], 0.1)], domain="com.microsoft", num_heads=4)
    projected = b.node("MatMul", "proj", [attended, b.const("proj.weight", b.rng.standard_normal([WIDTH, WIDTH]) * alive / 4)])
    h = b.node("Add", "residual", [projected, h])
    b.output(b.matmul("head", h, WIDTH, 8))
    return b.model([("ids", [1, SEQ], TensorProto.INT64)], outputs=[("y", [1, SEQ, 8])], name="fused_attention_block",
                   domains=MICROSOFT)


def test_fused_attention_reads_the_hidden_size_through_its_packed_weight_rows():
    model = fused_attention_block(dead=DEAD)
    assert not any(g["prunable"] and "proj" in g["sources"] for g in inspect(model)["groups"])
    analysis = analyze_model(load(model), hidden=True)
    group = stream_group(analysis)
    assert group.prunable and {s.node.name for s in group.sources} == {"embed", "proj"}
    keep = {g.index: np.arange(g.channels) for g in analysis.prunable_groups()}
    keep[group.index] = np.flatnonzero(~DEAD)
    data = {"ids": np.random.default_rng(1).integers(0, VOCAB, (8, SEQ))}
    result = prune(model, PruneConfig(plan=Plan.from_keep(analysis, keep), hidden=True, calibration=data, recover="none"))
    weight = next(t for t in result.model.graph.initializer if t.name == "qkv.weight")
    assert list(weight.dims) == [WIDTH - DEAD.sum(), 3 * WIDTH]
    inputs = {"ids": data["ids"][:1]}
    np.testing.assert_allclose(run(result.model, inputs)[0], run(model, inputs)[0], rtol=1e-5, atol=1e-5)


def test_without_the_option_a_stream_out_of_a_spelled_out_norm_points_to_it():
    reasons = [r for g in inspect(hidden_stream("spelled-out"))["groups"] for r in g.get("reasons", [])]
    assert any("a residual stream out of ReduceMean 'l1.norm.mean': try --hidden" in r for r in reasons), reasons
