"""ONNX's own Attention (opset 23), asked by the Attention handler (ops/fused.py) for the default domain.

Q, K and V come as [B, S, heads * head_size] (with `q_num_heads`, `kv_num_heads`) or as [B, heads, S,
head_size]. A unit is a K/V head with the Q heads that share it: K/V head g serves Q heads g*r .. g*r+r-1,
r = q_num_heads / kv_num_heads. The output carries, for each Q head, its K/V head's value channels.
Pruning sets the head counts and slices a constant mask's head axis; a computed mask over the heads,
past keys and values, and the read-out outputs (present key/value, the QK product) block.
"""

from __future__ import annotations

import numpy as np

from .base import Handler, attr, const_input, has_input, join_rows

MASK, PAST = 3, (4, 5)


class OnnxAttention(Handler):
    def propagate(self, node, ctx):
        maps = [ctx.channels(t) for t in node.inputs[:3]]
        ctx.block_unexpected(node, channel_inputs=(0, 1, 2))
        reason = self._refusal(node, maps, ctx)
        if reason is not None:
            ctx.block_inputs(node, f"ONNX Attention: {reason}")
            return
        heads = (m.ids.reshape(count, -1) for m, count in zip(maps, self._head_counts(node, maps)))
        ctx.set(node.outputs[0], type(maps[0])(maps[0].axis, join_heads(ctx, *heads)))

    @staticmethod
    def _head_counts(node, maps) -> tuple[int, int, int]:
        if maps[0].axis == 1:  # [B, heads, S, head_size]: one id per head
            return len(maps[0].ids), len(maps[1].ids), len(maps[2].ids)
        kv = int(attr(node, "kv_num_heads", 0))
        return int(attr(node, "q_num_heads", 0)), kv, kv

    def _refusal(self, node, maps, ctx) -> str | None:
        if any(m is None for m in maps):
            return "query, key and value are not all projections carrying channels"
        ranks = [len(ctx.shape(t) or ()) for t in node.inputs[:3]]
        if not (all(r == 3 and m.axis == 2 for r, m in zip(ranks, maps)) or
                all(r == 4 and m.axis == 1 for r, m in zip(ranks, maps))):
            return "heads are not on the feature axis of [B, S, features] nor the head axis of [B, heads, S, size]"
        heads = self._head_counts(node, maps)
        if min(heads) < 1 or heads[0] % heads[1] or any(len(m.ids) % n for m, n in zip(maps, heads)):
            return "query, key or value does not split into its head count"
        if any(has_input(node, i) for i in PAST) or any(out.name for out in node.outputs[1:]):
            return "past keys and values, or its present or QK outputs, are used"
        mask = ctx.shape(node.inputs[MASK]) if has_input(node, MASK) else None
        if mask is not None and const_input(node, MASK) is None and len(mask) >= 3 and mask[-3] > 1:
            return "a computed mask over the heads"
        return None

    def rewrite(self, node, rw):
        q_mask, k_mask = rw.mask(node.inputs[0]), rw.mask(node.inputs[1])
        if q_mask is None:
            return
        q_heads, kv_heads = (int(attr(node, name, len(mask))) for name, mask in
                             (("q_num_heads", q_mask), ("kv_num_heads", k_mask)))
        kept_q, kept_kv = q_mask.reshape(q_heads, -1)[:, 0], k_mask.reshape(kv_heads, -1)[:, 0]
        for name, kept in (("q_num_heads", kept_q), ("kv_num_heads", kept_kv)):
            if name in node.attrs:
                rw.set_attr(node, name, int(kept.sum()))
        mask = const_input(node, MASK) if has_input(node, MASK) else None
        if mask is not None and mask.ndim >= 3 and mask.shape[-3] == q_heads:
            rw.set_input(node, MASK, np.compress(kept_q, mask, axis=mask.ndim - 3))

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        return product_macs(in_shape, weight_shape, out_shape)


def join_heads(ctx, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Join the heads of Q, K and V, each [heads, head_size] ids: a head is one unit, and K/V head g is
    one unit with the Q heads that share it (g*r .. g*r+r-1, r = Q heads / K/V heads; r = 1 without
    grouped-query sharing). The output's ids: for each Q head, its K/V head's value channels."""
    for part in (q, k, v):
        join_rows(ctx, part)
    shared = np.arange(len(q)) // (len(q) // len(k))  # the K/V head of every Q head
    ctx.join(q[:, 0], k[shared, 0])
    ctx.join(k[:, 0], v[:, 0])
    return v[shared].reshape(-1)


def product_macs(query_shape, key_shape, out_shape) -> int | None:
    """Per Q head the scores (Q K^T) and the context (weights V): (Q's and the output's elements) x
    the keys' length (the axis before the last of K)."""
    if not (query_shape and key_shape and out_shape):
        return None
    return (int(np.prod(query_shape, dtype=np.int64)) + int(np.prod(out_shape, dtype=np.int64))) * key_shape[-2]
