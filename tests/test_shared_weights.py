"""Layers that read one weight (a Siamese network's branches, ALBERT's repeated layer, an exporter's
deduplicated constants) still share it when pruned: the analysis joins the channels indexing each axis of
the weight across its readers, so every reader slices it alike and the cut stores it once; where one
reader cannot slice an axis, the others' channels there are blocked; recovery leaves such layers as they
are (a fit of one reader alone would store the weight twice)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import PruneConfig, inspect, prune
from onnxprune.errors import NothingToPrune, UsageError
from tests.builders import Builder, run
from tests.oracle import assert_pruning_dead_channels_is_exact


def siamese() -> onnx.ModelProto:
    """a, b -> one Conv (3 -> 32) -> Relu -> one Conv (32 -> 16) -> a's minus b's."""
    b = Builder(seed=3)
    w1, b1 = b.randn("w1", [32, 3, 3, 3], 0.2), b.randn("b1", [32], 0.1)
    w2 = b.randn("w2", [16, 32, 3, 3], 0.06)
    branches = []
    for side in "ab":
        h = b.relu(f"relu_{side}", b.node("Conv", f"conv1_{side}", [side, w1, b1], pads=[1] * 4))
        branches.append(b.node("Conv", f"conv2_{side}", [h, w2], pads=[1] * 4))
    b.output(b.node("Sub", "distance", branches))
    return b.model([("a", [1, 3, 12, 12]), ("b", [1, 3, 12, 12])])


def applied_twice() -> onnx.ModelProto:
    """x -> Conv W (16 -> 16, 1x1) -> Relu -> the same Conv W again: its input channels are the graph
    input's on the first application, so no reader can slice them."""
    b = Builder(seed=4)
    w = b.randn("w", [16, 16, 1, 1], 0.25)
    h = b.relu("relu", b.node("Conv", "first", ["x", w]))
    b.output(b.node("Conv", "second", [h, w]))
    return b.model([("x", [1, 16, 6, 6])])


def albert() -> onnx.ModelProto:
    """Two residual feed-forward layers sharing their weights (ALBERT): x + W_down relu(W_up x), twice."""
    b = Builder(seed=5)
    up, down = b.randn("up", [8, 24], 0.35), b.randn("down", [24, 8], 0.2)
    stream = "x"
    for layer in range(2):
        hidden = b.relu(f"relu{layer}", b.node("MatMul", f"up{layer}", [stream, up]))
        stream = b.node("Add", f"residual{layer}", [stream, b.node("MatMul", f"down{layer}", [hidden, down])])
    b.output(stream)
    return b.model([("x", [2, 5, 8])])


def shared_readers(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes read each initializer."""
    reads = {t.name: 0 for t in model.graph.initializer}
    for node in model.graph.node:
        for name in node.input:
            if name in reads:
                reads[name] += 1
    return reads


def test_siamese_branches_keep_one_weight_and_halve_it():
    model = siamese()
    result = prune(model, PruneConfig(filters=0.5, scorer="l1"))
    assert shared_readers(result.model) == {"w1": 2, "b1": 2, "w2": 2}
    assert result.report["after"]["params"] * 2 == result.report["before"]["params"]


def test_siamese_pruning_is_exact():
    for seed in (0, 1):
        assert_pruning_dead_channels_is_exact(siamese(), seed)


def test_a_weight_one_reader_cannot_slice_blocks_the_others():
    model = applied_twice()
    try:
        prune(model, PruneConfig(filters=0.5, scorer="l1"))
    except NothingToPrune:
        pass
    else:
        raise AssertionError("the shared weight was cut")
    reasons = [r for g in inspect(model)["groups"] for r in g["reasons"]]
    assert any("weight 'w' is shared with Conv 'first'" in r for r in reasons), reasons


def test_albert_layers_are_one_group_and_keep_one_weight():
    model = albert()
    groups = [g for g in inspect(model)["groups"] if g["prunable"]]
    assert len(groups) == 1 and groups[0]["sources"] == ["up0", "up1"]
    result = prune(model, PruneConfig(filters=0.5, scorer="l1", round_to=1))
    assert shared_readers(result.model) == {"up": 2, "down": 2}
    assert result.report["after"]["params"] * 2 == result.report["before"]["params"]
    assert_pruning_dead_channels_is_exact(model, seed=0)


def test_recovery_leaves_layers_sharing_a_weight_as_they_are():
    rng = np.random.default_rng(0)
    calibration = {side: rng.random((20, 3, 12, 12), dtype=np.float32) for side in "ab"}
    result = prune(siamese(), PruneConfig(filters=0.5, calibration=calibration, recover="lstsq"))
    layers = result.report["recovery"]["layers"]
    assert {layer["name"] for layer in layers} == {"conv2_a", "conv2_b"}
    assert all(layer["status"] == "skipped" and "shared" in layer["reason"] for layer in layers)
    assert shared_readers(result.model) == {"w1": 2, "b1": 2, "w2": 2}


def test_low_rank_and_sparsity_leave_a_shared_weight_whole():
    for config, error in ((PruneConfig(rank=0.5), NothingToPrune), (PruneConfig(sparsity=0.5), UsageError)):
        try:
            prune(siamese(), config)
        except error as exc:
            assert "is shared with another node" in str(exc)
        else:
            raise AssertionError(f"{config} changed a shared weight")


def tied_embedding(residual: bool = True, head: str = "gemm") -> onnx.ModelProto:
    """ids -> Gather(table [50, 16]) -> a feed-forward layer (residual: added to the embedding, whose channels
    it then carries; else its own) -> LayerNorm -> Gemm(table, transB): the output layer tied to the table.
    `head` "transpose": MatMul(Transpose(table)) instead; "folded": MatMul(table^T stored as a second
    initializer, as an exporter folding that Transpose writes it)."""
    b = Builder(seed=6)
    table = b.randn("table", [50, 16], 0.5)
    embedded = b.node("Gather", "embed", [table, "ids"], axis=0)
    hidden = b.relu("relu", b.node("MatMul", "up", [embedded, b.randn("up.weight", [16, 32], 0.25)]))
    stream = b.node("MatMul", "down", [hidden, b.randn("down.weight", [32, 16], 0.2)])
    if residual:
        stream = b.node("Add", "residual", [embedded, stream])
    normed = b.node("LayerNormalization", "norm", [stream, b.const("gamma", np.ones(16)), b.const("beta", np.zeros(16))],
                    axis=-1)
    flat = b.node("Reshape", "flat", [normed, b.const("flat.shape", [-1, 16], np.int64)])
    if head == "gemm":
        b.output(b.node("Gemm", "head", [flat, table], transB=1))
    else:
        transposed = b.node("Transpose", "tied", [table], perm=[1, 0]) if head == "transpose" else \
            b.const("table.T", numpy_helper.to_array(b.inits[0]).T)
        b.output(b.node("MatMul", "head", [flat, transposed]))
    return b.model([("ids", [1, 6], onnx.TensorProto.INT64)], opset=17)


def test_an_embedding_table_tied_to_the_output_layer_stays_one_table():
    calibration = {"ids": np.random.default_rng(0).integers(0, 50, (10, 6))}
    for hidden, residual in ((False, True), (True, True), (True, False)):
        config = PruneConfig(filters=0.5, scorer="l1", round_to=1, hidden=hidden, calibration=calibration, recover="none")
        result = prune(tied_embedding(residual), config)
        assert shared_readers(result.model)["table"] == 2
        assert result.report["after"]["params"] < result.report["before"]["params"]


def test_a_table_tied_through_a_transpose_stays_one_table_even_once_the_exporter_folded_it():
    """Folding the Transpose stores the table twice; the analysis joins the two as one weight and the cut stores
    it once again, read through a Transpose: no more parameters than given, whatever l1 cuts (pfp's sample mode
    scales the head alone and leaves two tables). An exporter's folded copy (a second initializer) is stored
    once too. Recovery leaves the head as it leaves any layer sharing its weight, and says so."""
    calibration = {"ids": np.random.default_rng(0).integers(0, 50, (10, 6))}
    for head in ("transpose", "folded"):
        for filters, hidden, residual in ((0.0, False, True), (0.5, False, True), (0.5, True, True), (0.5, True, False)):
            model = tied_embedding(residual, head)
            config = PruneConfig(filters=filters, scorer="l1", round_to=1, hidden=hidden, calibration=calibration)
            result = prune(model, config)
            assert "table.T" not in shared_readers(result.model)
            assert shared_readers(result.model)["table"] == 2  # the Gather and the Transpose
            table = {t.name: t for t in result.model.graph.initializer}["table"]
            assert table.dims[1] == (8 if hidden else 16)
            before, after = result.report["before"]["params"], result.report["after"]["params"]
            stored_twice = 50 * 16 if head == "folded" else 0
            assert after == before - stored_twice if filters == 0 else after < before - stored_twice
            if filters > 0:  # the head reads the table through the Transpose: recovery says why it is left
                head, = [layer for layer in result.report["recovery"]["layers"] if layer["name"] == "head"]
                assert head["status"] == "skipped" and "'table' transposed" in head["reason"]
            if filters == 0:
                feed = {"ids": calibration["ids"][:1]}
                np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-6)


def test_a_model_with_external_data_has_its_constants_folded_too(tmp_path):
    """Folding runs onnxruntime on the constant part of the graph, which refused the absolute locations of
    a mapped model's tensors: with external data the Transpose stayed, the output layer read no constant
    weight and --hidden cut nothing. A GPT-2 exported by torch.onnx (dynamo, external data) the same."""
    path = tmp_path / "tied.onnx"
    onnx.save(tied_embedding(True, "transpose"), path, save_as_external_data=True, location="tied.onnx.data",
              size_threshold=1024)  # the table and the layers' weights
    calibration = {"ids": np.random.default_rng(0).integers(0, 50, (10, 6))}
    result = prune(str(path), PruneConfig(filters=0.5, scorer="l1", round_to=1, hidden=True, calibration=calibration))
    table = {t.name: t for t in result.model.graph.initializer}["table"]
    assert table.dims[1] == 8 and shared_readers(result.model)["table"] == 2
    assert result.report["after"]["params"] * 2 < result.report["before"]["params"]


def test_only_a_float_matrix_equal_to_another_transposed_and_not_symmetric_is_a_copy():
    import onnx_graphsurgeon as gs

    from onnxprune.io import transposed_copies

    rng = np.random.default_rng(1)
    a, symmetric = rng.standard_normal((3, 5)), rng.standard_normal((4, 4))
    symmetric = symmetric + symmetric.T
    other = a.T.copy()
    other[2, 1] += 1e-6  # equal in the corner compared first, not beyond
    tensors = {"a": a, "a.T": a.T.copy(), "sym": symmetric, "near": other, "sym.T": symmetric.T.copy(),
               "zeros": np.zeros((2, 6)), "zeros.T": np.zeros((6, 2)), "eye": np.eye(5), "eye2": np.eye(5)}
    constants = {k: gs.Constant(k, np.ascontiguousarray(v, np.float32)) for k, v in tensors.items()}
    constants["mask"] = gs.Constant("mask", np.triu(np.ones((4, 4), bool)))  # not a float: never a weight
    constants["mask.T"] = gs.Constant("mask.T", np.tril(np.ones((4, 4), bool)))
    x = gs.Variable("x", np.float32, [1, 3])
    nodes = [gs.Node("MatMul", f"n{i}", inputs=[x, c], outputs=[gs.Variable(f"y{i}")]) for i, c in enumerate(constants.values())]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[n.outputs[0] for n in nodes])
    pairs = {(copy.name, source.name) for copy, source in transposed_copies(graph)}
    assert pairs == {("a.T", "a")}  # symmetric ones, an identity and zeros look alike without being tied


def scaled_weight_read() -> onnx.ModelProto:
    """x -> Conv w (8 -> 16) -> Relu -> Conv (16 -> 4), plus w itself scaled by the input's mean and summed
    into the output: a reader of w (the Mul) that does not say how it would slice it."""
    b = Builder(seed=7)
    w = b.randn("w", [16, 8, 3, 3], 0.1)
    h = b.relu("relu", b.node("Conv", "first", ["x", w], pads=[1] * 4))
    y = b.node("Conv", "second", [h, b.randn("w2", [4, 16, 3, 3], 0.1)], pads=[1] * 4)
    scale = b.node("ReduceMean", "mean", ["x"], keepdims=0)
    b.output(b.node("Add", "plus", [y, b.node("ReduceSum", "total", [b.node("Mul", "scaled", [w, scale])], keepdims=0)]))
    return b.model([("x", [1, 8, 6, 6])])


def test_a_weight_also_read_by_a_node_that_cannot_say_how_it_slices_it_is_left_whole():
    reasons = [r for g in inspect(scaled_weight_read())["groups"] for r in g["reasons"]]
    assert any("weight 'w' is shared with Mul 'scaled'" in r for r in reasons), reasons


def test_pfp_s_sample_mode_scales_a_shared_weight_once():
    rng = np.random.default_rng(1)
    calibration = {side: rng.random((20, 3, 12, 12), dtype=np.float32) for side in "ab"}
    config = PruneConfig(filters=0.5, scorer="pfp", pfp_mode="sample", calibration=calibration, recover="none")
    assert shared_readers(prune(siamese(), config).model) == {"w1": 2, "b1": 2, "w2": 2}


def cloned_layers() -> onnx.ModelProto:
    """`albert` as torch exports identical layers: the second layer reads the first's weights through Identity
    nodes (an Identity of a constant, which folding would otherwise turn into a second copy)."""
    b = Builder(seed=5)
    up, down = b.randn("up", [8, 24], 0.35), b.randn("down", [24, 8], 0.2)
    weights = [(up, down), (b.node("Identity", "up_again", [up]), b.node("Identity", "down_again", [down]))]
    stream = "x"
    for layer, (w_up, w_down) in enumerate(weights):
        hidden = b.relu(f"relu{layer}", b.node("MatMul", f"up{layer}", [stream, w_up]))
        stream = b.node("Add", f"residual{layer}", [stream, b.node("MatMul", f"down{layer}", [hidden, w_down])])
    b.output(stream)
    return b.model([("x", [2, 5, 8])])


def test_weights_shared_through_identity_nodes_stay_shared():
    result = prune(cloned_layers(), PruneConfig(filters=0.5, scorer="l1", round_to=1))
    assert shared_readers(result.model) == {"up": 2, "down": 2}
    assert result.report["after"]["params"] * 2 == result.report["before"]["params"]


def test_the_cli_refuses_to_sparsify_or_factorize_only_shared_weights_in_one_line(tmp_path):
    """Exit 2 (--sparsity: nothing takes the pattern; no hint to the pattern already asked for) and 3 (--rank:
    nothing to factorize), one line naming the shared weight, nothing written."""
    from click.testing import CliRunner

    from onnxprune.cli import main

    source, out = tmp_path / "siamese.onnx", tmp_path / "out.onnx"
    onnx.save(siamese(), str(source))
    for args, code in ((["--sparsity", "0.5"], 2), (["--rank", "0.5"], 3)):
        run = CliRunner().invoke(main, [str(source), str(out), *args])
        assert run.exit_code == code, run.output
        assert len(run.output.strip().splitlines()) == 1 and "is shared with another node" in run.output
        assert "try --sparsity-pattern unstructured" not in run.output and not out.exists()
