"""Run a model over calibration batches and compare outputs with the original's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError, UsageError
from ..progress import bar

WORST_CHANNELS = 5  # channels each output lists in the report, worst first


def run_model(sess, calibration, batch_size: int, label: str = "onnxruntime run") -> dict[str, np.ndarray]:
    """All outputs over all samples, the batches joined on axis 0, or on the one axis whose size changes
    from batch to batch (an output with its batch elsewhere, e.g. CTC logits [steps, batch, classes])."""
    names = [o.name for o in sess.get_outputs()]
    collected = {n: [] for n in names}
    for feed in bar(calibration.batches(batch_size), label, total=-(-calibration.count // batch_size)):
        for name, value in zip(names, sess.run(names, feed)):
            collected[name].append(np.atleast_1d(value))
    return {n: joined(n, v) for n, v in collected.items()}


def joined(name: str, chunks: list[np.ndarray]) -> np.ndarray:
    shapes = {c.shape for c in chunks}
    ranks = {len(s) for s in shapes}
    varying = [axis for axis in range(min(ranks)) if len({s[axis] for s in shapes}) > 1] if len(ranks) == 1 else None
    if varying is None or len(varying) > 1:
        raise ModelError(f"output '{name}' changes shape between batches in more than one axis ({sorted(shapes)}): "
                         "its samples cannot be lined up; give --calib-batch 1, or cut the model before that output")
    return np.concatenate(chunks, axis=varying[0] if varying else 0)


CHUNK_ELEMENTS = 1 << 18  # values of an output compared at once: float64 copies of a whole output (the
# recognizer's [128, 40, 6625] is 272 MB each) cost more to allocate than to compute with


@dataclass
class ErrorSums:
    """Sums over an output and its pruned counterpart (reference a, result b), in float64: a.b, |a|^2, |b|^2,
    |a - b|^2, max |a - b|, and per channel along `axis` (None: no channel sums) |a - b|^2 and |a|^2."""

    dot: float = 0.0
    reference: float = 0.0
    result: float = 0.0
    difference: float = 0.0
    max_abs: float = 0.0
    channel_difference: np.ndarray | None = None
    channel_reference: np.ndarray | None = None


def _sample_step(values: np.ndarray) -> int:
    """Samples (axis 0) of `values` in one chunk of at most CHUNK_ELEMENTS values (at least one sample)."""
    return max(1, CHUNK_ELEMENTS // max(values.size // max(len(values), 1), 1))


def error_sums(reference: np.ndarray, result: np.ndarray, axis: int | None = None) -> ErrorSums:
    """`ErrorSums` taken a few samples (axis 0) at a time, each chunk widened to float64 on its own."""
    reference, result = np.atleast_1d(reference), np.atleast_1d(result)
    if axis is not None:
        axis %= reference.ndim
    step = _sample_step(reference)
    sums = ErrorSums()
    channel_parts: list[tuple[np.ndarray, np.ndarray]] = []
    maxima = [0.0]
    for start in range(0, max(len(reference), 1), step):  # (an output without samples: one empty chunk)
        a = reference[start:start + step].astype(np.float64)
        b = result[start:start + step].astype(np.float64)
        d = a - b
        sums.dot += float(np.vdot(a, b))
        sums.reference += float(np.vdot(a, a))
        sums.result += float(np.vdot(b, b))
        sums.difference += float(np.vdot(d, d))
        if d.size:
            maxima.append(float(np.abs(d).max()))
        if axis is not None:
            others = tuple(i for i in range(a.ndim) if i != axis)
            channel_parts.append((np.sum(d * d, axis=others), np.sum(a * a, axis=others)))
    sums.max_abs = float(np.max(maxima))  # NaN when any is (max() would drop it)
    if axis is not None:
        join = np.concatenate if axis == 0 else (lambda parts: np.sum(parts, axis=0))
        sums.channel_difference = join([d for d, _ in channel_parts])
        sums.channel_reference = join([a for _, a in channel_parts])
    return sums


def output_fidelity(reference: np.ndarray, result: np.ndarray, axis: int | None = None) -> dict:
    """cosine, relative L2 error and max |diff| over the whole output; top-1 agreement for [N, classes];
    the per-channel errors along `axis` (None: axis 1)."""
    floating = np.issubdtype(reference.dtype, np.floating)
    channel_axis = _channel_axis(reference, axis) if floating else None
    sums = error_sums(reference, result, channel_axis)
    norm = np.sqrt(sums.reference) * np.sqrt(sums.result)
    cosine = float(sums.dot / norm) if norm > 0 else float(np.array_equal(reference, result))
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1 and floating:
        top1 = float((reference.argmax(1) == result.argmax(1)).mean())
    return {"cosine": cosine, "rel_l2": relative_l2(sums),
            "max_abs_diff": sums.max_abs, "top1_agreement": top1,
            "channels": None if channel_axis is None else _worst_channels(sums, channel_axis)}


def relative_l2(sums: ErrorSums) -> float:
    """The whole output's relative L2 error from `error_sums` (its L2 error where the reference is zero)."""
    return float(_relative(np.sqrt(sums.difference), np.sqrt(sums.reference)))


def _relative(error, norm):
    """error / norm where the reference has any energy, else the error itself (element-wise)."""
    return np.divide(error, norm, out=np.array(error, dtype=np.float64), where=np.asarray(norm) > 0)


def channel_errors(sums: ErrorSums) -> np.ndarray:
    """The relative L2 error of every channel (each over all samples and positions) from `error_sums`."""
    return _relative(np.sqrt(sums.channel_difference), np.sqrt(sums.channel_reference))


def _channel_axis(reference: np.ndarray, axis: int | None) -> int | None:
    """The channel axis of an output (None: axis 1, none below rank 2)."""
    if axis is None and reference.ndim < 2:
        return None
    return 1 if axis is None else check_axis(axis, reference.ndim)


def _worst_channels(sums: ErrorSums, axis: int) -> dict:
    """The channel axis, its worst channels (index and relative L2 error, worst first) and the median error."""
    errors = channel_errors(sums)
    worst = np.argsort(-errors, kind="stable")[:WORST_CHANNELS]
    return {"axis": axis, "count": int(errors.size), "median": float(np.median(errors)),
            "worst": [{"index": int(i), "rel_l2": float(errors[i])} for i in worst]}


def check_axis(axis: int, rank: int, name: str = "the output") -> int:
    """`axis` as a non-negative index into `rank` axes, or a UsageError naming the option."""
    if not -rank <= axis < rank:
        raise UsageError(f"--output-axis {name}:{axis}: {name} has {rank} axes: give an axis from 0 to {rank - 1}")
    return axis % rank


def parse_output_axis(text: str) -> tuple[str, int]:
    """Parse ``NAME:AXIS`` (the name may itself contain ':')."""
    name, sep, axis = text.rpartition(":")
    if not sep or not name or not axis.lstrip("-").isdigit():
        raise UsageError(f"--output-axis '{text}' is not NAME:AXIS, e.g. output0:3 for an NHWC output")
    return name, int(axis)


def parse_output_axes(texts) -> dict[str, int]:
    """Parse every ``NAME:AXIS``; an output named twice is refused (the last would silently win)."""
    axes: dict[str, int] = {}
    for name, axis in map(parse_output_axis, texts):
        if name in axes:
            raise UsageError(f"--output-axis names {name} twice ({axes[name]} and {axis}): give each output once")
        axes[name] = axis
    return axes


def check_output_axes(axes: dict[str, int], shapes: dict[str, tuple | None]) -> None:
    """Refuse before any work an --output-axis naming no output, or an axis the output does not have
    (`shapes`: each output's inferred shape, None when unknown)."""
    unknown = sorted(set(axes) - set(shapes))
    if unknown:
        raise UsageError(f"--output-axis names unknown output(s) {unknown}: the model's outputs are "
                         f"{', '.join(shapes)}")
    for name, axis in axes.items():
        if shapes[name] is not None:
            check_axis(axis, len(shapes[name]), name)


def fidelity(reference: dict[str, np.ndarray], result: dict[str, np.ndarray], axes: dict[str, int] | None = None) -> dict:
    """Fidelity of the first output at top level, and of every output under "per_output"; `axes`: the
    channel axis of outputs where it is not axis 1."""
    axes = axes or {}
    per_output = {name: output_fidelity(reference[name], result[name], axes.get(name)) for name in reference}
    first = next(iter(per_output.values()))
    return {**first, "per_output": per_output, "reference_constant": constant_over_samples(reference)}


CONSTANT_SPREAD = 1e-5  # outputs varying across samples by less than this share of their magnitude are constant


def constant_over_samples(reference: dict[str, np.ndarray]) -> bool:
    """Whether the original's floating-point outputs are the same for every sample, up to CONSTANT_SPREAD of
    their largest magnitude (an untrained or zeroed head; a random-init net whose output barely depends on its
    input varied by 2e-7 of it): then no fidelity figure can tell a good cut from a bad one."""
    floating = [a for a in reference.values() if np.issubdtype(a.dtype, np.floating) and a.ndim and len(a) > 1]
    return bool(floating) and all(_spread(a) <= CONSTANT_SPREAD * max(float(a.max()), -float(a.min())) for a in floating)


def _spread(values: np.ndarray) -> float:
    """max |values - values[0]| over the samples (axis 0), a few samples at a time, in float64."""
    first = values[:1].astype(np.float64)
    step = _sample_step(values)
    return float(np.max([np.abs(values[start:start + step] - first).max() for start in range(0, len(values), step)]))


def worst_channel(fidelity: dict) -> tuple[str, dict, dict] | None:
    """(output name, its worst channel {index, rel_l2}, the output's fidelity) over every output with a
    channel axis; None when none has one."""
    candidates = [(name, f["channels"]["worst"][0], f) for name, f in fidelity["per_output"].items()
                  if f.get("channels") and f["channels"]["worst"]]
    return max(candidates, key=lambda c: c[1]["rel_l2"], default=None)
