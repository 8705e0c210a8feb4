"""Ops that move, cut or merge axes: Concat, Split, Slice, Flatten, Reshape, Expand, Gather, Transpose,
(Un)Squeeze, Shape."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import (HIDDEN, ONNX_DOMAINS, Handler, attr, const_input, gather_kept, has_input, join_rows, known_shape,
                   normalize_axis, onnx_op, pass_through, register, weight_axis_ids)


@register("Concat")
class ConcatHandler(Handler):
    """On the channel axis, output ids are the inputs' ids in order; on another axis, inputs are joined,
    and an untracked input must be a constant (sliced) or a constant broadcast by Expand (a ViT's class
    token `cls.expand(B, -1, -1)` with a dynamic batch: gathered at the kept channels)."""

    def propagate(self, node, ctx):
        maps = [ctx.channels(t) for t in node.inputs]
        tracked = [m for m in maps if m is not None]
        if not tracked:
            return
        shape = ctx.shape(node.outputs[0])
        if shape is None:
            ctx.block_inputs(node, "output shape unknown")
            return
        axis = normalize_axis(int(node.attrs["axis"]), len(shape))
        if any(m.axis != tracked[0].axis for m in tracked):
            ctx.block_inputs(node, "inputs carry channels on different axes")
            return
        channel_axis = tracked[0].axis
        if channel_axis == axis:
            parts = []
            for tensor, cmap in zip(node.inputs, maps):
                if cmap is not None:
                    parts.append(cmap.ids)
                    continue
                in_shape = ctx.shape(tensor)
                if in_shape is None:
                    ctx.block_inputs(node, f"input '{tensor.name}' has an unknown shape")
                    return
                parts.append(ctx.new_fixed(in_shape[axis], f"Concat '{node.name}' input '{tensor.name}'"))
            ctx.set(node.outputs[0], type(tracked[0])(axis, np.concatenate(parts)))
            return
        for cmap in tracked[1:]:
            ctx.join(tracked[0].ids, cmap.ids)
        computed = [t for t, m in zip(node.inputs, maps) if m is None and not isinstance(t, gs.Constant)]
        if any(not _expanded_constant(t, channel_axis, tracked[0].ids, ctx) for t in computed):
            ctx.block_inputs(node, "an untracked computed input spans the channels")
            return
        ctx.set(node.outputs[0], tracked[0])

    def rewrite(self, node, rw):
        mask = rw.mask(node.outputs[0])
        axis = normalize_axis(int(node.attrs["axis"]), rw.rank(node.outputs[0]))
        if mask is None or axis == rw.tracked_axis(node.outputs[0]):
            return
        channel_axis = rw.tracked_axis(node.outputs[0])
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                rw.set_input(node, i, np.compress(mask, tensor.values, axis=channel_axis))
            elif not rw.is_tracked(tensor):  # an expanded constant: its size there is fixed
                gather_kept(node, i, channel_axis, mask, rw)


def _expanded_constant(tensor: gs.Tensor, axis: int, ids: np.ndarray, ctx) -> bool:
    """Whether `tensor` is Expand(a constant) whose size at `axis` of `tensor` is that of the channels `ids`
    (over 1): Expand's broadcasting keeps that size whatever its shape input says (1 keeps it, anything
    but the size fails), so the channels' kept positions can be gathered from it at any input size."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or not onnx_op(node, "Expand") or ids.ndim != 1 or len(ids) < 2:
        return False
    data, shape = const_input(node, 0), ctx.shape(tensor)
    if data is None or shape is None:
        return False
    data_axis = axis - (len(shape) - data.ndim)
    return 0 <= data_axis and data.shape[data_axis] == len(ids)


def _split_sizes(node, length: int, n_out: int) -> list[int] | None:
    sizes = const_input(node, 1) if has_input(node, 1) else attr(node, "split")
    if has_input(node, 1) and sizes is None:
        return None
    if sizes is not None:
        return [int(s) for s in np.asarray(sizes).reshape(-1)]
    chunk = -(-length // n_out)  # opset 18 num_outputs: the last chunk may be smaller
    return [min(chunk, length - i * chunk) for i in range(n_out)]


@register("Split")
class SplitHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        rank = len(ctx.shape(node.inputs[0]) or ())
        axis = normalize_axis(int(attr(node, "axis", 0)), rank)
        if axis != x.axis:
            pass_through(node, ctx, outputs=range(len(node.outputs)))
            return
        sizes = _split_sizes(node, len(x.ids), len(node.outputs))
        if sizes is None or sum(sizes) != len(x.ids):
            ctx.block(x.ids, f"Split '{node.name}': split sizes are computed or do not add up")
            return
        offsets = np.cumsum([0] + sizes)
        for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:]):
            ctx.set(out, type(x)(axis, x.ids[lo:hi]))

    def rewrite(self, node, rw):
        mask = rw.mask(node.inputs[0])
        if mask is None or rw.tracked_axis(node.outputs[0]) != normalize_axis(int(attr(node, "axis", 0)), rw.rank(node.inputs[0])):
            return
        offsets = np.cumsum([0] + _split_sizes(node, len(mask), len(node.outputs)))
        sizes = np.array([mask[lo:hi].sum() for lo, hi in zip(offsets[:-1], offsets[1:])], dtype=np.int64)
        if rw.opset < 13:
            rw.set_attr(node, "split", [int(s) for s in sizes])
        elif has_input(node, 1):
            rw.set_input(node, 1, sizes)
        else:
            node.attrs.pop("num_outputs", None)
            rw.add_input(node, sizes)


def _slice_params(node, own: tuple[int, int, int] | None = None):
    """(starts, ends, axes, steps) as arrays, or None when any is computed. `own`: (axis, size, rank) of the
    sliced input's channels: starts and ends may then be computed from their count alone (torch.chunk's
    `Slice(x, i * ceil(C / n), (i + 1) * ceil(C / n))`, C read off Shape(x)), which is fixed; the rewrite
    makes them constants."""
    values = [const_input(node, i) if has_input(node, i) else None for i in range(1, 5)]
    if own is not None:
        values[:2] = [own_size_value(node.inputs[i + 1], node.inputs[0], *own) if v is None and has_input(node, i + 1) else v
                      for i, v in enumerate(values[:2])]
    if values[0] is None or values[1] is None or (has_input(node, 3) and values[2] is None) or (has_input(node, 4) and values[3] is None):
        return None
    starts, ends = values[0].astype(np.int64), values[1].astype(np.int64)
    axes = values[2] if values[2] is not None else np.arange(len(starts))
    steps = values[3] if values[3] is not None else np.ones(len(starts), dtype=np.int64)
    return starts, ends, axes.astype(np.int64), steps.astype(np.int64)


def _slice_range(start: int, end: int, length: int) -> tuple[int, int]:
    start, end = (s + length if s < 0 else s for s in (start, end))
    return int(np.clip(start, 0, length)), int(np.clip(end, 0, length))


@register("Slice")
class SliceHandler(Handler):
    def propagate(self, node, ctx):
        ctx.block_unexpected(node, channel_inputs=(0,))
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        params = _slice_params(node, (x.axis, len(x.ids), len(shape))) if shape is not None else None
        if params is None or shape is None:
            ctx.block(x.ids, f"Slice '{node.name}': computed slice bounds or unknown shape")
            return
        starts, ends, axes, steps = params
        axes = [normalize_axis(int(a), len(shape)) for a in axes]
        if x.axis not in axes:
            pass_through(node, ctx)
            return
        k = axes.index(x.axis)
        if steps[k] != 1:
            ctx.block(x.ids, f"Slice '{node.name}': strided slice of the channel axis")
            return
        lo, hi = _slice_range(int(starts[k]), int(ends[k]), len(x.ids))
        if hi <= lo:
            ctx.block(x.ids, f"Slice '{node.name}': empty channel slice")
            return
        ctx.set(node.outputs[0], type(x)(x.axis, x.ids[lo:hi]))

    def rewrite(self, node, rw):
        mask = rw.mask(node.inputs[0])
        if mask is None:
            return
        axis = rw.tracked_axis(node.inputs[0])
        starts, ends, axes, _ = _slice_params(node, (axis, len(mask), rw.rank(node.inputs[0])))
        axes = [normalize_axis(int(a), rw.rank(node.inputs[0])) for a in axes]
        starts, ends = starts.copy(), ends.copy()
        if axis in axes:
            k = axes.index(axis)
            lo, hi = _slice_range(int(starts[k]), int(ends[k]), len(mask))
            starts[k] = mask[:lo].sum()
            ends[k] = starts[k] + mask[lo:hi].sum()
        for index, values in ((1, starts), (2, ends)):
            if not isinstance(node.inputs[index], gs.Constant):  # computed from the unpruned count: its values
                node.inputs[index] = gs.Constant(rw.new_tensor(f"{node.name}_bounds").name,
                                                 values.astype(_index_type(node)))
            elif axis in axes:
                rw.set_input(node, index, values.astype(node.inputs[index].values.dtype))


def _index_type(node: gs.Node) -> np.dtype:
    """The integer type a Slice's starts, ends, axes and steps share (ONNX's Tind: int32 or int64)."""
    for tensor in node.inputs[1:5]:
        if isinstance(tensor, gs.Constant):
            return tensor.values.dtype
    typed = [np.dtype(t.dtype) for t in node.inputs[1:5] if t.name and t.dtype is not None]
    return typed[0] if typed else np.dtype(np.int64)


OWN_SIZE_ARITHMETIC = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Identity", "Concat", "Add", "Sub", "Mul", "Div")
MAX_ARITHMETIC_DEPTH = 12  # how far back a computed bound is followed


def own_size_value(tensor: gs.Tensor, source: gs.Tensor, axis: int, size: int, rank: int,
                   depth: int = MAX_ARITHMETIC_DEPTH):
    """The value of `tensor` when it is integer arithmetic on constants and on the size of axis `axis` of
    `source` (of `rank`) alone (`Gather(Shape(source), axis)` or a Slice of that shape holding only it), the
    size being `size`; else None. Nothing else of any shape is read, so the value holds whatever the other
    dims are."""
    if isinstance(tensor, gs.Constant):
        return tensor.values if tensor.values.dtype.kind in "iu" else None
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0 or node.domain not in ONNX_DOMAINS or node.op not in OWN_SIZE_ARITHMETIC:
        return None
    if node.op in ("Gather", "Slice"):
        return _own_size_read(node, tensor, source, axis, size, rank) if _reads_shape_of(node, source) else None
    values = [own_size_value(t, source, axis, size, rank, depth - 1) if t.name else None for t in node.inputs]
    if values[0] is None or (node.op not in ("Unsqueeze", "Squeeze") and any(v is None for v in values)):
        return None
    try:
        return _evaluated(node, values)
    except (ValueError, IndexError):  # a malformed shape computation: not followed
        return None


def _evaluated(node: gs.Node, values: list[np.ndarray]) -> np.ndarray | None:
    """`node` (one of OWN_SIZE_ARITHMETIC but Gather and Slice) applied to integer `values`."""
    if node.op in ("Unsqueeze", "Squeeze"):
        axes = axes_input(node)
        if axes is None and (node.op == "Unsqueeze" or has_input(node, 1)):
            return None
        if node.op == "Unsqueeze":
            return _unsqueezed(values[0], axes)
        return np.squeeze(values[0], axis=None if axes is None else tuple(axes))
    if node.op == "Cast":
        dtype = _integer_type(attr(node, "to"))
        return values[0].astype(dtype) if dtype is not None else None
    return values[0] if node.op == "Identity" else _integer_arithmetic(node, values)


def _reads_shape_of(node: gs.Node, source: gs.Tensor) -> bool:
    """`node`'s data input is the whole Shape of `source` (no start or end)."""
    return _whole_shape_source(node.inputs[0]) is source


def _own_size_read(node: gs.Node, tensor: gs.Tensor, source: gs.Tensor, axis: int, size: int, rank: int):
    """A Gather or Slice of Shape(source) that reads only entry `axis`: that entry's value, `size`."""
    if node.op == "Gather":
        index = const_input(node, 1)
        if index is None or int(attr(node, "axis", 0)) != 0:
            return None
        read = {normalize_axis(int(i), rank) for i in np.asarray(index).reshape(-1)}
        return np.full(np.shape(index), size, dtype=np.int64) if read == {axis} else None
    bounds = shape_slice(tensor, source, lambda t: t.values if isinstance(t, gs.Constant) else None)
    if bounds is None:
        return None
    lo, hi = _slice_range(*bounds, rank)
    return np.array([size], dtype=np.int64) if (lo, hi) == (axis, axis + 1) else None


def _unsqueezed(values: np.ndarray, axes: list[int]) -> np.ndarray:
    rank = values.ndim + len(axes)
    for a in sorted(normalize_axis(a, rank) for a in axes):
        values = np.expand_dims(values, a)
    return values


def _integer_type(to) -> np.dtype | None:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype if dtype.kind in "iu" else None


def _integer_arithmetic(node: gs.Node, values: list[np.ndarray]) -> np.ndarray | None:
    """Concat, Add, Sub, Mul or Div (truncating, as ONNX divides integers) of integer arrays; None on a
    division by zero or any other op."""
    if node.op == "Concat":
        return np.concatenate(values, axis=int(attr(node, "axis", 0)))
    a, b = values
    if node.op == "Div":
        if np.any(b == 0):
            return None
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(np.result_type(a, b))
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[node.op](a, b)


def _merge_ids(ids: np.ndarray, shape, axis: int, lo: int, hi: int) -> np.ndarray:
    """Channel id of every position of dims shape[lo:hi] flattened together (the channel axis among them)."""
    inner = int(np.prod(shape[axis + 1:hi], dtype=np.int64))
    outer = int(np.prod(shape[lo:axis], dtype=np.int64))
    return np.tile(np.repeat(ids, inner), outer)


@register("Flatten")
class FlattenHandler(Handler):
    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        if shape is None:
            ctx.block(x.ids, f"Flatten '{node.name}': input shape unknown")
            return
        split = normalize_axis(int(attr(node, "axis", 1)), len(shape))
        if x.axis < split:
            ctx.block(x.ids, f"Flatten '{node.name}': merges the channel axis with the batch axis")
            return
        ctx.set(node.outputs[0], type(x)(1, _merge_ids(x.ids, shape, x.axis, split, len(shape))))


@register("Reshape")
class ReshapeHandler(Handler):
    """Maps channels when the reshape keeps the channel axis and what follows it (merging leading dims),
    keeps what precedes it and merges it with trailing dims (a flatten), or splits it into blocks. Blocks
    that are merged back (through Transposes only: a channel shuffle) keep channel j of every block
    together; blocks that go on apart (attention heads: [B, S, heads, head_dim], or [B, S, 3, heads,
    head_dim] from a packed QKV projection) are units, each head kept or removed whole (with its Q, K
    and V parts when packed) and tracked on the heads axis. The channel axis and the dims behind it cut
    anew with a divisor G of its C channels first (torch's GroupNorm export: [N, C, H, W] -> [N, G, -1])
    make each of the G positions a unit of C/G channels; cut back to a multiple of G channels, each unit
    spreads over its C/G channels again (`_regrouped_units`). Anything else blocks. A target computed by a
    Concat (Shape/Gather exports) needs a constant or -1 at the channel entries, or there a copy of the
    input's own size at its channel axis when that axis stays as it is (HF Conv1D's `x.view(-1, x.size(-1))`,
    ViT's `flatten(2)`): it follows the kept count and is left; a target that is the
    whole Shape of a tensor carrying channels (the GroupNorm export's way back) follows that tensor when
    the output carries the same count on the same axis, joined with them position by position."""

    multi_axis = True

    def propagate(self, node, ctx):
        source = _whole_shape_source(node.inputs[1])
        own = ctx.channels(source) if source is not None else None
        cmap = self._output_map(node, ctx, target_follows=own is not None)
        if own is None:
            if cmap is not None:
                ctx.set(node.outputs[0], cmap)
            return
        if cmap is None or cmap.ids.ndim != 1 or own.ids.ndim != 1 or (cmap.axis, len(cmap.ids)) != (own.axis, len(own.ids)):
            reason = (f"Reshape '{node.name}': its target is the shape of '{source.name}', whose channels its output "
                      "does not carry")
            ctx.block(own.ids, reason)
            ctx.block_inputs(node, reason, positions=(0,))
            return
        ctx.join(own.ids, cmap.ids)
        ctx.set(node.outputs[0], cmap)

    @staticmethod
    def _output_map(node, ctx, target_follows: bool):
        """The output's channel map, or None (the input's channels blocked, or it carries none)."""
        found = _tracked_input(node, ctx, (node.inputs[0], node.outputs[0]))
        if found is None:
            return None
        x, (in_shape, out_shape) = found
        mapped = reshape_map(x.ids, list(in_shape), list(out_shape), x.axis)
        if mapped is None and (units := _regrouped_units(x.ids, list(in_shape), list(out_shape), x.axis)) is not None:
            join_rows(ctx, units[1])
            mapped = units[0], units[1][:, 0]
        if mapped is None:
            ctx.block(x.ids, f"Reshape '{node.name}': {list(in_shape)} -> {list(out_shape)} mixes the channel axis with others")
            return None
        axis, ids = mapped
        if ids.ndim > x.ids.ndim:
            offset, ids = _blocks(ids, node.outputs[0], ctx)
            axis += offset
        if not target_follows and not _entries_known(node, range(axis, axis + ids.ndim), ctx.shape):
            problem = _own_count_problem(node, axis, x.axis, ctx.shape) if _keeps_channel_axis(x.ids, (axis, ids)) else \
                f"Reshape '{node.name}': target shape is computed and its channel entry is not a constant"
            if problem is not None:
                ctx.block(x.ids, problem)
                return None
        return type(x)(axis, ids)

    def rewrite(self, node, rw):
        mask = rw.mask(node.outputs[0])
        if mask is None or _whole_shape_source(node.inputs[1]) is not None:
            return  # a target read off the Shape of a pruned tensor follows it
        axis = rw.tracked_axis(node.outputs[0])
        counts = {axis + i: int(mask.any(axis=tuple(a for a in range(mask.ndim) if a != i)).sum())
                  for i in range(mask.ndim)}
        if mask.ndim == 1 and const_input(node, 1) is None \
                and _own_count_problem(node, axis, rw.tracked_axis(node.inputs[0]),
                                      functools.partial(known_shape, rw.analysis.shapes)) is None:
            return  # the entry reads the pruned input's own count
        set_shape_entries(node, counts, rw)


@register("Expand")
class ExpandHandler(Handler):
    """Broadcasting to a shape (grouped-query attention repeats K/V heads so): channels on an axis that
    is not expanded pass; the shape's entry there is updated. With the hidden-size option, a tensor
    broadcast to the shape of one carrying channels (`mask.unsqueeze(-1).expand(x.size())`, mean pooling's
    mask) carries them too: its target is computed from that shape, so it follows the kept count."""

    def propagate(self, node, ctx):
        if ctx.allows(HIDDEN) and ctx.channels(node.inputs[0]) is None:
            self._follow_shape(node, ctx)
            return
        found = _tracked_input(node, ctx, (node.inputs[0], node.outputs[0], node.inputs[1]))
        if found is None:
            return
        x, (in_shape, out_shape, target) = found
        axis = x.axis + len(out_shape) - len(in_shape)
        if out_shape[axis] != in_shape[x.axis]:
            ctx.block(x.ids, f"Expand '{node.name}': expands the channel axis")
            return
        if not _entries_known(node, [axis - len(out_shape) + target[0]], ctx.shape):
            ctx.block(x.ids, f"Expand '{node.name}': target shape is computed and its channel entry is not a constant")
            return
        ctx.set(node.outputs[0], type(x)(axis, x.ids))

    @staticmethod
    def _follow_shape(node, ctx) -> None:
        """The output carries the channels of the tensor whose shape the target is computed from, when
        the input has size 1 on their axis and the output their count (else ShapeHandler blocked them if
        it read the count)."""
        source = _shape_source(node.inputs[1], set())
        x = ctx.channels(source) if source is not None else None
        axis = follows_channels(node, ctx, source, x) if x is not None else None
        if axis is not None:
            ctx.set(node.outputs[0], type(x)(axis, x.ids))

    def rewrite(self, node, rw):
        mask = rw.mask(node.outputs[0])
        if mask is not None and rw.mask(node.inputs[0]) is not None:  # else the target follows (`_follow_shape`)
            length = _vector_length(node.inputs[1], rw.analysis.shapes)
            set_shape_entries(node, {rw.tracked_axis(node.outputs[0]) - rw.rank(node.outputs[0]) + length: int(mask.sum())}, rw)


SHAPE_ARITHMETIC = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape", "Shape", "ConstantOfShape", "Mul",
                    "Equal", "Where", "Cast", "Slice")  # what exporters compute target shapes with


def follows_channels(expand, ctx, source, x) -> int | None:
    """The output axis of Expand `expand` that follows the channels `x` of `source` (whose shape its target
    is computed from): the axis aligned with theirs, where the input has size 1 and the output their count;
    else None."""
    in_shape, out_shape, x_shape = (ctx.shape(t) for t in (expand.inputs[0], expand.outputs[0], source))
    if None in (in_shape, out_shape, x_shape):
        return None
    axis = x.axis + len(out_shape) - len(x_shape)
    offset = axis - len(out_shape) + len(in_shape)
    if not 0 <= axis < len(out_shape) or out_shape[axis] != len(x.ids) or offset < 0 or in_shape[offset] != 1:
        return None
    return axis


def _expand_targets(vector: gs.Tensor, seen: set) -> list[gs.Node] | None:
    """The Expands whose target shape a shape vector computes through shape arithmetic (those not found
    before, in `seen`); None when it is used otherwise."""
    found = []
    for consumer in vector.outputs:
        if consumer.name in seen:
            continue
        seen.add(consumer.name)
        if consumer.op == "Expand" and vector is consumer.inputs[1] and vector is not consumer.inputs[0]:
            found.append(consumer)
            continue
        if consumer.op not in SHAPE_ARITHMETIC:
            return None
        for out in consumer.outputs:
            further = _expand_targets(out, seen)
            if further is None:
                return None
            found += further
    return found


def _shape_source(vector: gs.Tensor, seen: set) -> gs.Tensor | None:
    """The tensor whose Shape a target shape is computed from, through shape arithmetic (the first found)."""
    for producer in vector.inputs:
        if producer.name in seen or producer.op not in SHAPE_ARITHMETIC:
            continue
        seen.add(producer.name)
        if producer.op == "Shape":
            return producer.inputs[0]
        for tensor in producer.inputs:
            found = _shape_source(tensor, seen)
            if found is not None:
                return found
    return None


def _tracked_input(node, ctx, tensors):
    """(input 0's channels, the shapes of `tensors`) after blocking channels at the other inputs; None when
    input 0 carries none, or a shape is unknown (its channels then blocked)."""
    ctx.block_unexpected(node, channel_inputs=(0,))
    x = ctx.channels(node.inputs[0])
    if x is None:
        return None
    shapes = [ctx.shape(t) for t in tensors]
    if any(shape is None for shape in shapes):
        ctx.block(x.ids, f"{node.op} '{node.name}': shape unknown")
        return None
    return x, shapes


def _entries_known(node, positions, shape_of) -> bool:
    """Whether the shape input (input 1) of `node` is a constant, or a Concat with a constant piece at
    each of `positions` (positions before the vector's start are not in it)."""
    return const_input(node, 1) is not None or all(
        p < 0 or _target_piece(node.inputs[1], p, shape_of) is not None for p in positions)


def set_shape_entries(node, counts: dict[int, int], rw) -> None:
    """Give the shape input (input 1) of `node` the counts at their positions: a constant is replaced; a
    computed one (a Concat with constant pieces there) is read from a copy of that Concat, since other
    nodes may read it."""
    if isinstance(node.inputs[1], gs.Constant):
        rw.set_input(node, 1, _with_counts(node.inputs[1].values, counts, 0))
        return
    concat = node.inputs[1].inputs[0]
    pieces, offset = list(concat.inputs), 0
    for i, piece in enumerate(concat.inputs):
        if isinstance(piece, gs.Constant):
            pieces[i] = _with_counts(piece.values, counts, offset)
        offset += _vector_length(piece, rw.analysis.shapes)
    if any(isinstance(p, np.ndarray) and not np.array_equal(p, old.values) for p, old in zip(pieces, concat.inputs)):
        node.inputs[1] = rw.add_node("Concat", pieces, axis=0)


def _vector_length(tensor: gs.Tensor, shapes: dict) -> int:
    return len(tensor.values) if isinstance(tensor, gs.Constant) else shapes[tensor.name][0]


def _with_counts(target: np.ndarray, counts: dict[int, int], offset: int) -> np.ndarray:
    """Target-shape entries `target` (starting at position `offset`) with the positive entries at the
    positions of `counts` replaced by those counts (0 copies a dim and -1 is inferred: they stay)."""
    target = target.copy()
    for position, count in counts.items():
        k = position - offset
        if 0 <= k < len(target) and target[k] > 0:
            target[k] = count
    return target


def _blocks(ids: np.ndarray, tensor: gs.Tensor, ctx) -> tuple[int, np.ndarray]:
    """Channel ids split into blocks, `ids` shaped like the split axes: joined so that the reshape can be
    sliced; (the first output axis that carries channels, counted from the split, and its ids)."""
    if _merged_back(tensor, ctx.shape):  # a channel shuffle: prune the same j in every block
        rows = ids.reshape(-1, ids.shape[-1])
        for row in rows[1:]:
            ctx.join(rows[0], row)
        return 0, ids
    # The blocks go on apart: [heads, head_dim], or [3, heads, head_dim] for a packed QKV projection.
    # The axis before the last is the unit axis: each of its positions is one unit, tracked there alone.
    units = np.moveaxis(ids, -2, 0).reshape(ids.shape[-2], -1)
    join_rows(ctx, units)
    return ids.ndim - 2, units[:, 0]


def _merged_back(tensor: gs.Tensor, shape_of) -> bool:
    """Whether every consumer of `tensor` is a Reshape that merges axes (not one that only splits or adds
    a unit axis, as attention's [B * heads, S, head_dim] -> [B, heads, S, head_dim] does), or a Transpose
    whose output is merged back."""
    consumers = tensor.outputs
    return bool(consumers) and all(
        (c.op == "Reshape" and _merges(c, shape_of)) or (c.op == "Transpose" and _merged_back(c.outputs[0], shape_of))
        for c in consumers)


def _merges(reshape: gs.Node, shape_of) -> bool:
    """Some output dim spans two input dims (a boundary between input dims is none between output dims)."""
    before, after = shape_of(reshape.inputs[0]), shape_of(reshape.outputs[0])
    if before is None or after is None:
        return True
    return bool(set(np.cumprod(before, dtype=np.int64).tolist()) - set(np.cumprod(after, dtype=np.int64).tolist()))


def _target_piece(target: gs.Tensor, position: int, shape_of):
    """The value at `position` of a target shape built by Concat from pieces (PyTorch's
    ``x.view(x.size(0), -1)``, or ``[B, S, heads, head_dim]`` from Shape/Gather), when that piece is a
    constant; else None."""
    producer = target.inputs[0] if target.inputs else None
    if producer is None or producer.op != "Concat":
        return None
    offset = 0
    for piece in producer.inputs:
        shape = shape_of(piece)
        if shape is None or len(shape) != 1:
            return None
        if offset <= position < offset + shape[0]:
            return int(piece.values[position - offset]) if isinstance(piece, gs.Constant) else None
        offset += shape[0]
    return None


def reshape_map(ids, in_shape, out_shape, axis):
    """(output axis, output ids) for a reshape, or None when the channels cannot be followed."""
    tail = len(in_shape) - axis
    if len(out_shape) >= tail and out_shape[len(out_shape) - tail:] == in_shape[axis:]:
        return len(out_shape) - tail, ids
    lead = _prod(in_shape[:axis])
    for start in reversed(range(len(out_shape))):  # the leading dims may be regrouped: [S, C] -> [1, S, ...]
        if _prod(out_shape[:start]) == lead:
            # leading dims that vanish ([N, C, H, W] -> [C, -1]) may be a batch of 1 only at the analysed shape:
            # then the dims behind the channels must stay as they are, else a larger batch mixes into them
            mapped = _map_channel_dims(ids, in_shape[axis:], out_shape[start:], regroup=start > 0 or axis == 0)
            if mapped is not None:
                return start, mapped
    return _merge_with_outer(ids, in_shape, out_shape, axis) if ids.ndim == 1 else None


def _regrouped_units(ids, in_shape, out_shape, axis):
    """(output axis, ids as rows [units, channels per unit]) when the 1-D channel axis (C channels) and the
    dims behind it are cut anew into a first axis of M positions and the rest, the dims before them kept:
    M dividing C (torch's GroupNorm export, [N, C, H, W] -> [N, G, -1]), position g holds channels
    g * C/M .. (g + 1) * C/M - 1 and nothing else, a unit of C/M channels; C dividing M (the way back,
    [N, G, L] -> [N, C, H, W]), position g spreads over M/C channels, rows of one. Else None."""
    if ids.ndim != 1 or len(out_shape) <= axis or out_shape[:axis] != in_shape[:axis] \
            or _prod(out_shape[axis:]) != _prod(in_shape[axis:]):
        return None
    count, positions = in_shape[axis], out_shape[axis]
    if positions < count and count % positions == 0:
        return axis, ids.reshape(positions, count // positions)
    if positions > count and positions % count == 0:
        return axis, np.repeat(ids, positions // count)[:, None]
    return None


def _whole_shape_source(target: gs.Tensor) -> gs.Tensor | None:
    """The tensor whose whole Shape (no start or end) `target` is, else None."""
    shape = target.inputs[0] if target.inputs else None
    if shape is None or not onnx_op(shape, "Shape") or int(attr(shape, "start", 0)) != 0 or "end" in shape.attrs:
        return None
    return shape.inputs[0]


SHAPE_COPY = ("Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast", "Identity")  # pick, cut, join, retype


def copied_dim(vector: gs.Tensor, index: int, shape_of, depth: int = MAX_ARITHMETIC_DEPTH):
    """(tensor, axis) when entry `index` of the integer vector `vector` is a copy of Shape(tensor)[axis]
    (through SHAPE_COPY ops with constant indices, bounds and axes: torch's `x.size(-1)`,
    `x.shape[:2]`), else None."""
    node = vector.inputs[0] if vector.inputs else None
    if node is None or depth == 0 or node.domain not in ONNX_DOMAINS:
        return None
    if node.op == "Shape":
        rank = len(shape_of(node.inputs[0]) or ())
        start = normalize_axis(int(attr(node, "start", 0)), rank)
        return (node.inputs[0], start + index) if 0 <= start + index < rank else None
    if node.op in ("Squeeze", "Unsqueeze", "Cast", "Identity"):  # the order of the entries stays
        return copied_dim(node.inputs[0], index, shape_of, depth - 1)
    if node.op == "Concat":
        for piece in node.inputs:
            shape = shape_of(piece)
            if shape is None or len(shape) != 1:
                return None
            if index < shape[0]:
                return copied_dim(piece, index, shape_of, depth - 1)
            index -= shape[0]
        return None
    data = shape_of(node.inputs[0])
    if node.op not in ("Gather", "Slice") or data is None or len(data) != 1:
        return None
    picked = _picked_entry(node, index, data[0])
    return None if picked is None else copied_dim(node.inputs[0], picked, shape_of, depth - 1)


def _picked_entry(node: gs.Node, index: int, length: int) -> int | None:
    """The entry of a vector of `length` that entry `index` of Gather or Slice `node`'s output reads."""
    if node.op == "Gather":
        indices = const_input(node, 1)
        if indices is None or int(attr(node, "axis", 0)) != 0 or index >= indices.size:
            return None
        return normalize_axis(int(indices.reshape(-1)[index]), length)
    params = _slice_params(node)
    if params is None or len(params[2]) != 1 or normalize_axis(int(params[2][0]), 1) != 0 or params[3][0] != 1:
        return None
    lo, hi = _slice_range(int(params[0][0]), int(params[1][0]), length)
    return lo + index if lo + index < hi else None


def _keeps_channel_axis(ids: np.ndarray, mapped) -> bool:
    """Whether a reshape's output map `mapped` ((axis, ids) from `reshape_map`) is the input's channel
    axis as it is: the same ids, neither split nor merged with other dims."""
    return mapped is not None and mapped[1].ndim == 1 and np.array_equal(mapped[1], ids)


def _own_count_problem(reshape: gs.Node, axis: int, channel_axis: int, shape_of) -> str | None:
    """None when entry `axis` of `reshape`'s target copies the size of its own input at its `channel_axis`
    (HF Conv1D's `x.view(-1, x.size(-1))`): that entry is then the kept count at any size and need not be
    rewritten; else why not."""
    copied = copied_dim(reshape.inputs[1], axis, shape_of)
    if copied is None:
        return f"Reshape '{reshape.name}': target shape is computed and its channel entry is not a constant"
    tensor, dim = copied
    if tensor is not reshape.inputs[0]:
        return (f"Reshape '{reshape.name}': its target's channel entry is the size of '{tensor.name}', not of its "
                f"input '{reshape.inputs[0].name}'")
    if dim != channel_axis:
        return (f"Reshape '{reshape.name}': its target's channel entry is its input's axis {dim}, not its channel "
                f"axis {channel_axis}")
    return None


def _merge_with_outer(ids, in_shape, out_shape, axis):
    """(output axis, ids) when the channel axis merges with dims before it (and maybe after it):
    [S, B, directions, hidden] -> [S, B, directions * hidden]; else None."""
    for lo in range(axis - 1, -1, -1):
        for hi in range(axis + 1, len(in_shape) + 1):
            start = len(out_shape) - len(in_shape[hi:]) - 1
            if start >= 0 and out_shape[start + 1:] == in_shape[hi:] and out_shape[start] == _prod(in_shape[lo:hi]) \
                    and _prod(out_shape[:start]) == _prod(in_shape[:lo]):
                return start, _merge_ids(ids, in_shape, axis, lo, hi)
    return None


def _map_channel_dims(ids, dims, out_dims, regroup: bool = True):
    """The ids over `out_dims` when the channel axes (first in `dims`) merge with trailing dims or the
    channel axis splits into blocks, the dims behind them unchanged or (`regroup`) regrouped among themselves
    (torch's flatten(2): [C, H, W] -> [C, H * W]); else None."""
    def rest_fits(out_rest, rest) -> bool:
        return _prod(out_rest) == _prod(rest) if regroup else list(out_rest) == list(rest)

    span = ids.ndim  # input axes the channels occupy
    for hi in range(span, len(dims) + 1):  # merge the channel axes with trailing dims
        if _prod(dims[:hi]) == out_dims[0] and rest_fits(out_dims[1:], dims[hi:]):
            return np.repeat(ids.reshape(-1), _prod(dims[span:hi]))
    if span == 1:  # split the channel axis into blocks
        for n in range(2, len(out_dims) + 1):
            if _prod(out_dims[:n]) == dims[0] and rest_fits(out_dims[n:], dims[1:]):
                return ids.reshape(out_dims[:n])
    return None


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64))


@register("Gather")
class GatherHandler(Handler):
    """Picking positions along an axis that carries no channels (a class token `x[:, 0]`, one part of a
    packed Q/K/V) keeps the channels, on an axis shifted by the indices' rank; along the channel axis it
    blocks. With the hidden-size option, an embedding lookup (rows of a constant [tokens, width] table
    picked by computed ids) is a source of `width` channels on the output's last axis: the table's columns
(a graph output carrying them keeps its width, `AnalysisContext.widen`)."""

    def propagate(self, node, ctx):
        if ctx.allows(HIDDEN) and self.embedding_table(node) is not None and ctx.shape(node.outputs[0]):
            ctx.widen(ctx.new_source(node, node.outputs[0], self.embedding_table(node).shape[1],
                                     len(ctx.shape(node.outputs[0])) - 1))
            return
        found = _tracked_input(node, ctx, node.inputs[:2])
        if found is None:
            return
        x, (shape, indices) = found
        axis = normalize_axis(int(attr(node, "axis", 0)), len(shape))
        if axis == x.axis:
            ctx.block(x.ids, f"Gather '{node.name}': gathers along the channel axis")
            return
        ctx.set(node.outputs[0], type(x)(x.axis if x.axis < axis else x.axis + len(indices) - 1, x.ids))

    @staticmethod
    def embedding_table(node) -> np.ndarray | None:
        table = const_input(node, 0)
        if table is None or table.ndim != 2 or int(attr(node, "axis", 0)) not in (0, -2) or const_input(node, 1) is not None:
            return None
        return table

    def hidden_width(self, node, ctx):
        table = self.embedding_table(node)
        return None if table is None else table.shape[1]

    def weight_channels(self, node, ctx):
        """An embedding table's columns are sliced only where it is a source (a table tied to an LM head)."""
        table = self.embedding_table(node)
        if table is None:
            return None
        y = ctx.channels(node.outputs[0])
        shape = ctx.shape(node.outputs[0])
        axis = len(shape) - 1 if shape else -1
        return node.inputs[0], {1: weight_axis_ids(y, axis, table.shape[1])}

    def rewrite(self, node, rw):
        mask = rw.mask(node.outputs[0])
        if mask is not None and rw.is_source(node):
            rw.set_input(node, 0, node.inputs[0].values[:, mask])

    def filter_weights(self, node):
        return self.embedding_table(node).T


@register("Transpose")
class TransposeHandler(Handler):
    multi_axis = True

    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        perm = attr(node, "perm")
        if perm is None:
            if shape is None:
                ctx.block(x.ids, f"Transpose '{node.name}': rank unknown")
                return
            perm = list(reversed(range(len(shape))))
        perm = list(perm)
        moved = [perm.index(x.axis + i) for i in range(x.ids.ndim)]
        start = min(moved)
        if sorted(moved) != list(range(start, start + len(moved))):
            ctx.block(x.ids, f"Transpose '{node.name}': separates the axes the channels are split across")
            return
        order = [perm[q] - x.axis for q in range(start, start + len(moved))]
        ctx.set(node.outputs[0], type(x)(start, x.ids.transpose(order)))


def axes_input(node):
    """The `axes` of a Squeeze, Unsqueeze or Reduce: its attribute, else its constant input 1 (None: absent or computed)."""
    axes = attr(node, "axes")
    if axes is None and has_input(node, 1):
        axes = const_input(node, 1)
        if axes is None:
            return None
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


@register("Squeeze")
class SqueezeHandler(Handler):
    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        axes = axes_input(node)
        if shape is None or (axes is None and has_input(node, 1)):
            ctx.block(x.ids, f"Squeeze '{node.name}': shape or axes unknown")
            return
        axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else [normalize_axis(a, len(shape)) for a in axes]
        if x.axis in axes:
            ctx.block(x.ids, f"Squeeze '{node.name}': squeezes the channel axis")
            return
        ctx.set(node.outputs[0], type(x)(x.axis - sum(a < x.axis for a in axes), x.ids))


@register("Unsqueeze")
class UnsqueezeHandler(Handler):
    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        axes = axes_input(node)
        if shape is None or axes is None:
            ctx.block(x.ids, f"Unsqueeze '{node.name}': shape or axes unknown")
            return
        out_rank = len(shape) + len(axes)
        axis = x.axis
        for a in sorted(normalize_axis(a, out_rank) for a in axes):
            if a <= axis:
                axis += 1
        ctx.set(node.outputs[0], type(x)(axis, x.ids))


@register("Shape")
class ShapeHandler(Handler):
    """Reading a shape is harmless unless the channel count itself is read (copied only into the channel
    entry of a Reshape of the same tensor, it follows the kept count: `_count_copy_problem`)."""

    def propagate(self, node, ctx):
        x = ctx.channels(node.inputs[0])
        if x is None:
            return
        shape = ctx.shape(node.inputs[0])
        if shape is None:
            ctx.block(x.ids, f"Shape '{node.name}': rank unknown")
            return
        rank = len(shape)
        start = normalize_axis(int(attr(node, "start", 0)), rank)
        end = normalize_axis(int(attr(node, "end", rank)), rank) if "end" in node.attrs else rank
        if not start <= x.axis < end:
            return
        position = x.axis - start
        expands = _expand_targets(node.outputs[0], set()) if ctx.allows(HIDDEN) else None
        if expands and all(follows_channels(e, ctx, node.inputs[0], x) is not None for e in expands):
            return  # the count sizes tensors that carry the channels on (`ExpandHandler._follow_shape`)
        outputs = ctx.outputs_anywhere  # (a copy passed out of an If's branch leaves as one does out of the model)
        if node.outputs[0].name in outputs:
            ctx.block(x.ids, f"Shape '{node.name}': the channel count is a model output")
            return
        own = (node.inputs[0], x.axis, len(x.ids), rank) if start == 0 and end == rank else None
        for consumer in node.outputs[0].outputs:
            if position in _shape_entries_read(consumer, end - start, outputs) \
                    and not _sizes_own_resizes(consumer, x.axis) and not _reshape_target(consumer, node.outputs[0]) \
                    and not (own and _bounds_of_own_slices(consumer.outputs, own, outputs)):
                problem = _count_copy_problem(node, consumer, x, ctx, outputs)
                if problem is not None:
                    ctx.block(x.ids, problem)
                    return


def _count_copy_problem(shape: gs.Node, reader: gs.Node, x, ctx, graph_outputs: frozenset[str]) -> str | None:
    """None when Shape `shape`'s channel entry, through `reader` (of its output), is only copied into
    target entries of Reshapes of its own input that are their outputs' channel axis, that axis the input's
    as it is (`ReshapeHandler` then leaves the entry to follow the count); else why not. `x`: the channels."""
    source, generic = shape.inputs[0], f"Shape '{shape.name}': the channel count is read and used"
    reshapes = _shape_copies_into(reader, graph_outputs) if _copies(reader, shape.outputs[0]) else None
    if reshapes is None:
        return generic
    for reshape in reshapes:
        if reshape.inputs[0] is not source:
            return (f"Shape '{shape.name}': the channel count of '{source.name}' sizes Reshape '{reshape.name}' "
                    f"of another tensor, '{reshape.inputs[0].name}'")
        in_shape, out_shape = ctx.shape(source), ctx.shape(reshape.outputs[0])
        mapped = None if out_shape is None else reshape_map(x.ids, list(in_shape), list(out_shape), x.axis)
        if not _keeps_channel_axis(x.ids, mapped):
            return generic
        length = (ctx.shape(reshape.inputs[1]) or (0,))[0]
        copies = [p for p in range(length) if _is_dim(copied_dim(reshape.inputs[1], p, ctx.shape), source, x.axis)]
        if not copies:  # the count reached the target but is not found copied: its length unknown, or picked by it
            return generic
        if copies != [mapped[0]]:
            return (f"Shape '{shape.name}': the channel count is copied to entries {copies} of Reshape "
                    f"'{reshape.name}''s target, not (only) to its channel axis {mapped[0]}")
    return None


def _is_dim(copied, tensor: gs.Tensor, axis: int) -> bool:
    return copied is not None and copied[0] is tensor and copied[1] == axis


def _shape_copies_into(reader: gs.Node, graph_outputs: frozenset[str],
                       depth: int = MAX_ARITHMETIC_DEPTH) -> list[gs.Node] | None:
    """The Reshapes whose targets the outputs of `reader` reach through SHAPE_COPY ops alone (as their
    data, not their indices or bounds), when `reader` and they are such ops and nothing else reads them;
    else None."""
    if not onnx_op(reader, *SHAPE_COPY) or depth == 0:
        return None
    found = []
    for tensor in reader.outputs:
        if tensor.name in graph_outputs or not tensor.outputs:
            return None
        for user in tensor.outputs:
            if onnx_op(user, "Reshape") and user.inputs[1] is tensor and user.inputs[0] is not tensor:
                found.append(user)
                continue
            further = _shape_copies_into(user, graph_outputs, depth - 1) if _copies(user, tensor) else None
            if further is None:
                return None
            found += further
    return found


def _copies(user: gs.Node, tensor: gs.Tensor) -> bool:
    """`user` reads `tensor` only as data (any input of a Concat, else input 0), not as indices or bounds."""
    data = user.inputs if user.op == "Concat" else user.inputs[:1]
    return any(t is tensor for t in data) and not any(t is tensor for t in user.inputs[len(data):])


def _reshape_target(consumer: gs.Node, shape: gs.Tensor) -> bool:
    """`consumer` reads the whole shape `shape` only as a Reshape's target: the Reshape's handler then
    checks that its output carries the shaped tensor's channels (`ReshapeHandler.propagate`), or blocks."""
    return onnx_op(consumer, "Reshape") and consumer.inputs[1] is shape \
        and consumer.inputs[0] is not shape and _whole_shape_source(shape) is not None


def _bounds_of_own_slices(tensors, own: tuple, graph_outputs: frozenset[str],
                          depth: int = MAX_ARITHMETIC_DEPTH) -> bool:
    """`tensors` (computed from Shape(source)) are read only by integer arithmetic that ends in the starts
    and ends of Slices of `source` itself, each computed from the size of its channel axis alone
    (`own_size_value`; torch.chunk): the Slices then follow the count exactly (`SliceHandler`). `own`:
    (source, channel axis, its size, source's rank)."""
    source = own[0]
    for tensor in tensors:
        if depth == 0 or tensor.name in graph_outputs or not tensor.outputs:  # no reader here: a subgraph's output
            return False
        for reader in tensor.outputs:
            if onnx_op(reader, "Slice") and reader.inputs[0] is source:
                if any(t is tensor and i not in (1, 2) for i, t in enumerate(reader.inputs)) \
                        or own_size_value(tensor, *own) is None:
                    return False
            elif not onnx_op(reader, *OWN_SIZE_ARITHMETIC) \
                    or not _bounds_of_own_slices(reader.outputs, own, graph_outputs, depth - 1):
                return False
    return True


def _sizes_own_resizes(consumer: gs.Node, axis: int) -> bool:
    """`consumer` (a reader of Shape(x)) only builds the `sizes` of Resizes of x itself, the entries up to
    the channel `axis` copied from the shape (torch's `interpolate(x, size=...)`): the count then follows x
    at run time."""
    head = consumer.outputs[0] if consumer.outputs else None
    return head is not None and all(
        concat.op == "Concat" and concat.inputs[0] is head and list(concat.inputs).count(head) == 1
        and all(r.inputs[3:4] == [concat.outputs[0]] and resize_sizes_follow_input(r, axis)
                for r in concat.outputs[0].outputs)
        for concat in head.outputs)


def resize_sizes_follow_input(resize: gs.Node, axis: int) -> bool:
    """A Resize whose `sizes` are Concat(Slice(Shape(its input), 0, k), ...) along axis 0, k past the
    channel `axis`: the leading entries, channels included, are its input's own at run time."""
    if resize.op != "Resize" or len(resize.inputs) < 4 or not resize.inputs[3].inputs or "axes" in resize.attrs:
        return False  # (with `axes`, opset 18, the sizes need not start at axis 0)
    concat = resize.inputs[3].inputs[0]
    if concat.op != "Concat" or int(attr(concat, "axis", 0)) != 0:
        return False
    bounds = shape_slice(concat.inputs[0], resize.inputs[0], lambda t: t.values if isinstance(t, gs.Constant) else None)
    return bounds is not None and bounds[0] == 0 and bounds[1] > axis


def shape_slice(tensor: gs.Tensor, source: gs.Tensor, values) -> tuple[int, int] | None:
    """(start, end) when `tensor` is Slice(Shape(source), start, end) along axis 0 with step 1, else None;
    `values(t)`: a constant tensor's values or None (the rules read Constant nodes too)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "Slice" or node.domain not in ONNX_DOMAINS or len(node.inputs) < 3:
        return None
    shape = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if (shape is None or shape.op != "Shape" or shape.inputs[0] is not source or int(attr(shape, "start", 0)) != 0
            or "end" in shape.attrs):
        return None
    found = [values(t) for t in node.inputs[1:5]]
    if any(v is None or v.size != 1 for v in found):
        return None
    starts, ends, *rest = (int(v.reshape(())) for v in found)
    return (starts, ends) if all(v == want for v, want in zip(rest, (0, 1))) else None  # axis 0, step 1


def _shape_entries_read(consumer: gs.Node, length: int, graph_outputs: frozenset[str],
                        depth: int = MAX_ARITHMETIC_DEPTH) -> set[int]:
    """Entries of a shape vector that `consumer` reads (all of them unless it is a constant Gather or
    Slice, the ways exporters pick the batch size out of a shape, or a Cast or Identity whose readers are:
    Paddle's exports cast a shape before slicing it)."""
    everything = set(range(length))
    if consumer.op in ("Cast", "Identity") and depth > 0:
        copy = consumer.outputs[0] if consumer.outputs else None
        if copy is None or copy.name in graph_outputs or not copy.outputs:
            return everything
        return set().union(*(_shape_entries_read(reader, length, graph_outputs, depth - 1) for reader in copy.outputs))
    if consumer.op == "Gather" and int(attr(consumer, "axis", 0)) == 0:
        index = const_input(consumer, 1)
        return everything if index is None else {normalize_axis(int(i), length) for i in np.asarray(index).reshape(-1)}
    if consumer.op == "Slice":
        params = _slice_params(consumer)
        if params is None or len(params[2]) != 1 or normalize_axis(int(params[2][0]), 1) != 0 or params[3][0] != 1:
            return everything
        lo, hi = _slice_range(int(params[0][0]), int(params[1][0]), length)
        return set(range(lo, hi))
    return everything
