"""A padding mask added to the attention scores after torch's expansion over the heads (nn.MultiheadAttention's
`key_padding_mask`: [B, S] viewed as [B, 1, 1, S], expanded to [B, heads, 1, S], reshaped to [B * heads, 1,
S] and viewed back as [B, heads, -1, S]) holds the same values for every head: the heads stay prunable, the
pruned model gathering the kept heads of the mask; a computed operand whose heads differ still blocks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxprune import PruneConfig, inspect, prune
from tests.builders import Builder, run
from tests.oracle import drop_every_other, zero_dropped

HEADS, HEAD_DIM, WIDTH = 4, 8, 32
ANALYSED = {"x": [1, 6, 16], "pad": [1, 6]}
SIZES = [(1, 6), (3, 6), (1, 9), (3, 4)]  # (batch, sequence)


def masked_attention(mixed: bool = False) -> onnx.ModelProto:
    """x [B, S, 16] -> q, k, v (16 -> 32, 4 heads of 8) -> softmax(q k^T + mask) v -> out (32 -> 8), the mask
    -1e4 where `pad` [B, S] is true, expanded over the heads as torch does with B and S read off shapes.
    `mixed`: the mask [B, S] expanded to [B, S, heads] and viewed as [B, heads, 1, S], its heads differing."""
    b = Builder(seed=7)
    q, k, v = (b.matmul(name, "x", 16, WIDTH) for name in ("q", "k", "v"))
    split = b.const("split", [0, 0, HEADS, HEAD_DIM], np.int64)
    q, k, v = (b.node("Transpose", f"{name}_heads", [b.node("Reshape", f"{name}_split", [t, split])], perm=perm)
               for name, t, perm in (("q", q, [0, 2, 1, 3]), ("k", k, [0, 2, 3, 1]), ("v", v, [0, 2, 1, 3])))
    scores = b.node("MatMul", "scores", [q, k])
    mask = b.node("Where", "mask", ["pad", b.const("masked", -1e4), b.const("open", 0.0)])
    shape, axes = b.node("Shape", "pad_shape", ["pad"]), b.const("axes", [0], np.int64)
    batch, seq = (b.node("Unsqueeze", f"{name}_entry", [b.node("Gather", name, [shape, b.const(f"{name}.index", i, np.int64)],
                                                                    axis=0), axes]) for i, name in enumerate(("batch", "seq")))
    one, heads = b.const("one", [1], np.int64), b.const("heads", [HEADS], np.int64)
    if mixed:
        wide = b.node("Expand", "expand", [b.node("Unsqueeze", "mask_last", [mask, b.const("last", [2], np.int64)]),
                                           b.const("expand_shape", [1, 1, HEADS], np.int64)])
        mask = b.node("Reshape", "mask_heads", [wide, b.node("Concat", "heads_target", [batch, heads, one, seq], axis=0)])
    else:
        mask = b.node("Reshape", "mask_view", [mask, b.node("Concat", "view_target", [batch, one, one, seq], axis=0)])
        mask = b.node("Expand", "expand", [mask, b.const("expand_shape", [1, HEADS, 1, 1], np.int64)])
        batch_heads = b.node("Mul", "batch_heads", [batch, heads])
        mask = b.node("Reshape", "mask_flat", [mask, b.node("Concat", "flat_target", [batch_heads, one, seq], axis=0)])
        back = b.node("Concat", "back_target", [batch, heads, b.const("rest", [-1], np.int64), seq], axis=0)
        mask = b.node("Reshape", "mask_heads", [mask, back])
    weights = b.node("Softmax", "softmax", [b.node("Add", "masked_scores", [scores, mask])], axis=-1)
    context = b.node("Transpose", "context", [b.node("MatMul", "attend", [weights, v])], perm=[0, 2, 1, 3])
    merged = b.node("Reshape", "merge", [context, b.const("merge_target", [0, 0, WIDTH], np.int64)])
    b.output(b.matmul("out", merged, WIDTH, 8))
    return b.model([("x", ["B", "S", 16]), ("pad", ["B", "S"], TensorProto.BOOL)], outputs=[("y", None)], opset=17)


def feed(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Row i pads its last i positions (never all of them)."""
    x = np.random.default_rng(batch * 10 + seq).standard_normal((batch, seq, 16)).astype(np.float32)
    return {"x": x, "pad": np.arange(seq)[None] >= seq - np.arange(batch)[:, None] % seq}


def heads_group(model: onnx.ModelProto) -> dict:
    (group,) = [g for g in inspect(model, ANALYSED)["groups"] if g["sources"][0] == "q"]
    return group


def test_a_mask_expanded_over_the_heads_leaves_them_prunable_and_one_whose_heads_differ_blocks():
    copied, mixed = heads_group(masked_attention()), heads_group(masked_attention(mixed=True))
    assert copied["channels"] == HEADS and copied["prunable"]
    assert not mixed["prunable"]
    assert any("'mask_heads_out' spans the channels but is computed" in r for r in mixed["reasons"])


@pytest.mark.parametrize("seed", [0, 1])
def test_pruning_dead_heads_under_a_padding_mask_is_exact_at_batch_1_and_3(seed):
    zeroed, plan = zero_dropped(masked_attention(), keep_fn=lambda a: drop_every_other(a, seed), input_shapes=ANALYSED)
    heads = next(g for g in plan.groups if g.channels == HEADS)
    assert 0 < len(heads.keep) < HEADS, "the oracle must drop a head"
    result = prune(zeroed, PruneConfig(plan=plan, input_shapes=ANALYSED))
    q_weight = next(t for t in result.model.graph.initializer if t.name == "q.weight")
    assert q_weight.dims[1] == len(heads.keep) * HEAD_DIM
    for batch, seq in SIZES:
        np.testing.assert_allclose(run(result.model, feed(batch, seq))[0], run(zeroed, feed(batch, seq))[0],
                                   rtol=1e-5, atol=1e-5)
