"""onnxruntime's fused ops (domain com.microsoft), as `onnxruntime.transformers.optimizer` writes them.

BiasGelu, FastGelu and QuickGelu are an activation of `x + bias`: channels pass, the bias is sliced.
SkipLayerNormalization and SkipSimplifiedLayerNormalization normalise `input + skip + bias` over the
last axis: channels there (the hidden size) are blocked; on another axis input and skip are joined.
EmbedLayerNormalization reads token ids and embedding tables: no channels reach it. Attention and
MultiHeadAttention block the channels reaching them (their heads are not pruned yet).
"""

from __future__ import annotations

from .base import Handler, register
from .elementwise import BroadcastHandler


@register("BiasGelu", "FastGelu", "QuickGelu")
class BiasActivationHandler(BroadcastHandler):
    """An activation of `input + bias` (bias optional): the broadcast of an Add, then a unary op."""


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
class SkipNormHandler(BroadcastHandler):
    """LayerNorm (or RMSNorm) over the last axis of `input + skip + bias`."""

    def propagate(self, node, ctx):
        tracked = [(t, m) for t in node.inputs[:2] if (m := ctx.channels(t)) is not None]
        ctx.block_unexpected(node, channel_inputs=(0, 1))
        if not tracked:
            return
        ranks = [len(ctx.shape(t) or ()) for t, _ in tracked]
        if any(rank == 0 or m.axis == rank - 1 for rank, (_, m) in zip(ranks, tracked)):
            ctx.block_inputs(node, "normalises across the channel axis (the hidden size)", positions=(0, 1))
            return
        super().propagate(node, ctx)
        cmap = ctx.channels(node.outputs[0])
        for out in node.outputs[1:]:  # mean, inverse deviation, the sum: they keep the leading axes
            if cmap is not None and out.name:
                ctx.set(out, cmap)


@register("EmbedLayerNormalization")
class EmbedNormHandler(Handler):
    """Embedding lookups from token ids: channels reaching it cannot be sliced."""

    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=())


@register("Attention", "MultiHeadAttention")
class FusedAttentionHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_inputs(node, "fused attention: its heads are not pruned yet")
