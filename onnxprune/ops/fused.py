"""onnxruntime's fused ops (domain com.microsoft), as `onnxruntime.transformers.optimizer` writes them.

BiasGelu, FastGelu and QuickGelu are an activation of `x + bias`: channels pass, the bias is sliced.
SkipLayerNormalization and SkipSimplifiedLayerNormalization normalise `input + skip + bias` over the
last axis: channels there (the hidden size) are blocked; on another axis input and skip are joined.
EmbedLayerNormalization reads token ids and embedding tables: no channels reach it. With the hidden-size
option (`--hidden`) the three prune the hidden size as LayerNormalization does (`norm.py`): input and skip
joined on the last axis, the parameters sliced, the LayerNorm forms inexact; EmbedLayerNormalization is
then a source, its tables' columns, and Attention reads it through the rows of its packed weight.

Attention (com.microsoft) projects its input with one packed weight [input, Q | K | V columns] and
bias, attends per head and writes [B, S, V hidden]: its output is a source whose units are the heads
(head_size channels each); pruning heads slices each head's Q, K and V columns and bias and sets
`num_heads` (and `qkv_hidden_sizes`). Channels reaching its input (the hidden size) are blocked, as are
graphs that read its key/value cache. MultiHeadAttention reads Q, K and V projected apart, [B, S, width]
each: a head is one unit of the three, its output carries V's channels, and pruning heads slices its
packed bias and sets `num_heads` (packed or cached inputs are blocked).

FusedConv (onnxruntime's ORT_ENABLE_EXTENDED level writes it) is a Conv whose output passes through a
fused activation (`activation`, with scalar `activation_params`: elementwise, so channels pass) after
adding an optional input Z of the output's shape (a residual): pruned as Conv, Z joined with the output's
channels as an Add's operands are (a constant Z sliced).
"""

from __future__ import annotations

import numpy as np

from .attention import OnnxAttention, join_heads, product_macs
from .base import HIDDEN, MICROSOFT, Handler, attr, const_input, has_input, join_rows, register
from .conv import ConvHandler
from .elementwise import BroadcastHandler, hidden_hint
from .norm import hidden_norm, keep_root_mean_square, slice_norm_parameters

ATTENTION_BIAS = 5  # Attention's input of per-head additive score biases [B or 1, heads or 1, S, T]
RESIDUAL = 3  # FusedConv's input Z, added to the convolution before the activation


@register("FusedConv")
class FusedConvHandler(ConvHandler):
    """activation(Conv(X, W, B) + Z): the Conv's weight layout, slicing and MACs; Z carries the output's channels."""

    domains = (MICROSOFT,)
    channel_inputs = (0, RESIDUAL)

    def propagate(self, node, ctx):
        super().propagate(node, ctx)
        if has_input(node, RESIDUAL):
            self._join_residual(node, ctx)

    @staticmethod
    def _join_residual(node, ctx) -> None:
        y, z = ctx.channels(node.outputs[0]), ctx.channels(node.inputs[RESIDUAL])
        where = f"{node.op} '{node.name}'"
        if y is None and z is not None:
            ctx.block(z.ids, f"{where}: its residual Z is added to convolution outputs whose channels are not tracked")
        elif y is not None and z is None and const_input(node, RESIDUAL) is None:
            ctx.block(y.ids, f"{where}: its residual Z spans the channels but is computed from untracked channels"
                             + hidden_hint(node.inputs[RESIDUAL], len(y.ids), ctx))
        elif y is not None and z is not None and (z.axis != y.axis or len(z.ids) != len(y.ids)):
            ctx.block(np.concatenate([y.ids.ravel(), z.ids.ravel()]),
                      f"{where}: its residual Z carries other channels than its output")
        elif y is not None and z is not None:
            ctx.join(y.ids, z.ids)

    def rewrite(self, node, rw):
        super().rewrite(node, rw)
        mask, residual = rw.mask(node.outputs[0]), const_input(node, RESIDUAL)
        if mask is not None and residual is not None and residual.ndim > 1 and residual.shape[1] == len(mask):
            rw.set_input(node, RESIDUAL, np.compress(mask, residual, axis=1))

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        """The Conv's, and one per output element for the activation, as the ops `rules/fused_conv.py`
        spells it out as count (so a MACs target scaled by the rewrite's saving is not tightened by it;
        a residual Z's Add: `optional_macs`)."""
        conv = super().macs(op, attrs, in_shape, weight_shape, out_shape)
        return None if conv is None else conv + int(np.prod(out_shape, dtype=np.int64))

    def optional_macs(self, op, given, out_shape):
        """A residual Z's Add: one per output element, as an Add node counts."""
        added = len(given) > RESIDUAL and given[RESIDUAL] and out_shape is not None
        return int(np.prod(out_shape, dtype=np.int64)) if added else 0

    def timing_sides(self, node):
        return None  # the latency model builds its timed layers in ONNX's domain


@register("BiasGelu", "FastGelu", "QuickGelu")
class BiasActivationHandler(BroadcastHandler):
    """An activation of `input + bias` (bias optional): the broadcast of an Add, then a unary op."""

    domains = (MICROSOFT,)


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
class SkipNormHandler(BroadcastHandler):
    """LayerNorm (or RMSNorm) over the last axis of `input + skip + bias`."""

    domains = (MICROSOFT,)

    def hidden_width(self, node, ctx):
        shape = ctx.shape(node.inputs[0])
        return shape[-1] if shape else None

    def propagate(self, node, ctx):
        tracked = [(t, m) for t in node.inputs[:2] if (m := ctx.channels(t)) is not None]
        ctx.block_unexpected(node, channel_inputs=(0, 1))
        if not tracked:
            return
        ranks = [len(ctx.shape(t) or ()) for t, _ in tracked]
        hidden = [rank > 0 and m.axis == rank - 1 for rank, (_, m) in zip(ranks, tracked)]
        if any(hidden) and (not all(hidden) or not ctx.allows(HIDDEN)):
            ctx.block_inputs(node, "normalises across the channel axis (the hidden size), which --hidden prunes",
                             positions=(0, 1))
            return
        super().propagate(node, ctx)
        cmap = ctx.channels(node.outputs[0])
        if cmap is None:
            return
        if any(hidden):  # the mean and inverse deviation hold one value per row: only the sum carries them
            if len(node.outputs) > 3 and node.outputs[3].name:
                ctx.set(node.outputs[3], cmap)
            hidden_norm(node, ctx, cmap.ids, centred=node.op == "SkipLayerNormalization")
            return
        for out in node.outputs[1:]:  # mean, inverse deviation, the sum: they keep the leading axes
            if out.name:
                ctx.set(out, cmap)

    def rewrite(self, node, rw):
        super().rewrite(node, rw)  # slices gamma, beta and bias when the hidden size loses channels
        mask = rw.mask(node.outputs[0])
        if mask is not None and "Simplified" in node.op and rw.tracked_axis(node.outputs[0]) == rw.rank(node.outputs[0]) - 1:
            keep_root_mean_square(node, rw, 2, len(mask) / int(mask.sum()), default_epsilon=1e-12)  # com.microsoft's default


@register("EmbedLayerNormalization")
class EmbedNormHandler(Handler):
    """Embedding lookups from token ids: channels reaching it cannot be sliced. With the hidden-size option
    its output is a source: word, position and segment tables (inputs 2-4) lose columns, gamma and beta
    (5, 6) entries; the sum (output 2) carries the same channels."""

    domains = (MICROSOFT,)

    TABLES = (2, 3, 4)

    def hidden_width(self, node, ctx):
        table = const_input(node, 2)
        return None if table is None or table.ndim != 2 else table.shape[1]

    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=())
        if not ctx.allows(HIDDEN) or any(const_input(node, i) is None for i in range(2, 7) if has_input(node, i)):
            return
        ids = ctx.new_source(node, node.outputs[0], const_input(node, 2).shape[1], axis=2)
        if len(node.outputs) > 2 and node.outputs[2].name:
            ctx.set(node.outputs[2], ctx.channels(node.outputs[0]))
        ctx.inexact(ids, f"{node.op} '{node.name}': normalises over the hidden size (--hidden): its mean and "
                         "variance change with the channels removed")

    def rewrite(self, node, rw):
        mask = rw.mask(node.outputs[0])
        if mask is None:
            return
        for i in self.TABLES:
            if has_input(node, i):
                rw.set_input(node, i, node.inputs[i].values[:, mask])
        slice_norm_parameters(node, rw, mask, first=5)

    def filter_weights(self, node):
        return np.concatenate([node.inputs[i].values for i in self.TABLES if has_input(node, i)]).T


@register("MultiHeadAttention")
class MultiHeadAttentionHandler(Handler):
    domains = (MICROSOFT,)

    def propagate(self, node, ctx):
        maps = [ctx.channels(t) if has_input(node, i) else None for i, t in enumerate(node.inputs[:3])]
        ctx.block_unexpected(node, channel_inputs=(0, 1, 2))
        reason = self._refusal(node, maps, ctx)
        if reason is not None:
            ctx.block_inputs(node, reason)
            return
        heads = (m.ids.reshape(int(attr(node, "num_heads")), -1) for m in maps)
        join_heads(ctx, *heads)
        ctx.set(node.outputs[0], maps[2])  # output channel c is the attention-weighted V channel c

    @staticmethod
    def _refusal(node, maps, ctx) -> str | None:
        if node.domain != MICROSOFT:
            return "not onnxruntime's MultiHeadAttention"
        if any(m is None for m in maps):
            return "fused attention: query, key and value are not all projections carrying channels"
        ranks = [len(ctx.shape(t) or ()) for t in node.inputs[:3]]
        if any(rank != 3 or m.axis != 2 for rank, m in zip(ranks, maps)):
            return "fused attention: packed or cached query, key or value"
        if any(has_input(node, i) for i in range(6, len(node.inputs))) or any(o.name for o in node.outputs[1:]):
            return "fused attention: its key/value cache is read or written"
        for index in (3, ATTENTION_BIAS):
            if has_input(node, index) and const_input(node, index) is None:
                return "fused attention: a computed bias"
        heads = int(attr(node, "num_heads", 0))
        if heads < 1 or any(len(m.ids) % heads for m in maps):
            return "fused attention: query, key or value does not split into num_heads heads"
        return None

    def rewrite(self, node, rw):
        masks = [rw.mask(t) for t in node.inputs[:3]]
        if masks[0] is None:
            return
        heads = int(attr(node, "num_heads"))
        kept = masks[0].reshape(heads, -1)[:, 0]
        if has_input(node, 3):
            rw.set_input(node, 3, node.inputs[3].values[np.concatenate(masks)])
        slice_head_bias(node, rw, heads, kept)
        rw.set_attr(node, "num_heads", int(kept.sum()))

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        return product_macs(in_shape, weight_shape, out_shape)


def slice_head_bias(node, rw, heads: int, kept: np.ndarray) -> None:
    """Keep the kept heads of a constant per-head score bias [B or 1, heads or 1, S, T], if any."""
    bias = const_input(node, ATTENTION_BIAS) if has_input(node, ATTENTION_BIAS) else None
    if bias is not None and bias.shape[1] == heads:
        rw.set_input(node, ATTENTION_BIAS, bias[:, kept])


def qkv_sizes(attrs: dict, packed: int) -> list[int]:
    """The widths of the Q, K and V columns of Attention's packed weight."""
    sizes = attrs.get("qkv_hidden_sizes")
    return [int(n) for n in sizes] if sizes is not None and len(sizes) else [packed // 3] * 3


@register("Attention")
class AttentionHandler(Handler):
    """onnxruntime's Attention; ONNX's own (the default domain, opset 23) is `OnnxAttention`'s."""

    domains = (MICROSOFT,)

    onnx = OnnxAttention()

    def propagate(self, node, ctx):
        if node.domain != MICROSOFT:
            self.onnx.propagate(node, ctx)
            return
        weight, shape = const_input(node, 1), ctx.shape(node.outputs[0])
        if self._reads_hidden(node, ctx, weight):
            ctx.block_unexpected(node, channel_inputs=(0,))  # the packed weight's rows are sliced
        else:
            ctx.block_inputs(node, "fused attention: its input features (the hidden size) are not pruned")
        reason = self._refusal(node, weight, shape)
        if reason is not None:
            self._refused_heads(node, ctx, weight, shape, reason)
            return
        heads = int(attr(node, "num_heads"))
        ids = ctx.new_source(node, node.outputs[0], shape[-1], axis=len(shape) - 1).reshape(heads, -1)
        join_rows(ctx, ids)  # a head is one unit

    @staticmethod
    def _reads_hidden(node, ctx, weight) -> bool:
        """With the hidden-size option: the input's features arrive on its last axis, read by rows of a
        constant packed weight."""
        x, shape = ctx.channels(node.inputs[0]), ctx.shape(node.inputs[0])
        return (ctx.allows(HIDDEN) and x is not None and shape is not None and x.axis == len(shape) - 1
                and weight is not None and weight.ndim == 2)

    @staticmethod
    def _refused_heads(node, ctx, weight, out_shape, reason: str) -> None:
        """The heads as a group blocked with `reason`, so that `inspect` shows why (the input channels,
        the hidden size, are blocked already); without a known output width, the inputs carry it."""
        width = out_shape[-1] if out_shape else None
        if width is None and weight is not None and weight.ndim == 2:
            width = qkv_sizes(node.attrs, weight.shape[1])[2]
        if width is None:
            ctx.block_inputs(node, reason)
            return
        axis = len(out_shape) - 1 if out_shape else 2
        ctx.block(ctx.new_source(node, node.outputs[0], int(width), axis=axis), f"{node.op} '{node.name}': {reason}")

    @staticmethod
    def _refusal(node, weight, out_shape) -> str | None:
        """Why the heads of this node cannot be pruned, or None."""
        if weight is None or weight.ndim != 2 or (has_input(node, 2) and const_input(node, 2) is None):
            return "fused attention: weight or bias is not a constant"
        if out_shape is None:
            return "fused attention: output shape unknown"
        if any(out.name for out in node.outputs[1:]):
            return "fused attention: its key/value cache (present) is read"
        if has_input(node, ATTENTION_BIAS) and const_input(node, ATTENTION_BIAS) is None:
            return "fused attention: a computed per-head score bias"
        sizes, heads = qkv_sizes(node.attrs, weight.shape[1]), int(attr(node, "num_heads", 0))
        if heads < 1 or any(n % heads for n in sizes) or sum(sizes) != weight.shape[1]:
            return "fused attention: packed weight does not split into num_heads heads"
        return None

    def rewrite(self, node, rw):
        if node.domain != MICROSOFT:
            self.onnx.rewrite(node, rw)
            return
        features = rw.mask(node.inputs[0])
        if features is not None:  # the hidden size (--hidden): rows of the packed weight
            rw.set_input(node, 1, node.inputs[1].values[features])
        mask = rw.mask(node.outputs[0])
        if mask is None:
            return
        heads = int(attr(node, "num_heads"))
        kept = mask.reshape(heads, -1)[:, 0]
        sizes = qkv_sizes(node.attrs, node.inputs[1].values.shape[1])
        columns = np.concatenate([np.repeat(kept, n // heads) for n in sizes])
        rw.set_input(node, 1, node.inputs[1].values[:, columns])
        if has_input(node, 2):
            rw.set_input(node, 2, node.inputs[2].values[columns])
        slice_head_bias(node, rw, heads, kept)
        rw.set_attr(node, "num_heads", int(kept.sum()))
        if "qkv_hidden_sizes" in node.attrs:
            rw.set_attr(node, "qkv_hidden_sizes", [n // heads * int(kept.sum()) for n in sizes])

    def filter_weights(self, node):
        """Per output channel: its V column, and the Q and K columns at the same place of its head."""
        weight = node.inputs[1].values
        q, k, v = qkv_sizes(node.attrs, weight.shape[1])
        if not q == k == v:
            return weight[:, q + k:].T
        return np.concatenate([weight[:, :q].T, weight[:, q:q + k].T, weight[:, q + k:].T], axis=1)

    def macs(self, op, attrs, in_shape, weight_shape, out_shape):
        """The packed projection, then per head the scores (Q K^T) and the context (weights V)."""
        if weight_shape and len(weight_shape) > 2:  # ONNX's own: K where the packed weight would be
            return self.onnx.macs(op, attrs, in_shape, weight_shape, out_shape)
        if not (in_shape and out_shape and weight_shape):
            return None
        rows = int(np.prod(in_shape[:-1], dtype=np.int64))
        q, _, v = qkv_sizes(attrs, weight_shape[1])
        return rows * in_shape[-1] * weight_shape[1] + rows * in_shape[-2] * (q + v)
