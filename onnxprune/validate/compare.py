"""Run a model over calibration batches and compare outputs with the original's."""

from __future__ import annotations

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


def output_fidelity(reference: np.ndarray, result: np.ndarray, axis: int | None = None) -> dict:
    """cosine, relative L2 error and max |diff| over the whole output; top-1 agreement for [N, classes];
    the per-channel errors along `axis` (None: axis 1)."""
    # float64 once for every figure (no copy when already float64), and the difference once
    wide_reference, wide_result = reference.astype(np.float64, copy=False), result.astype(np.float64, copy=False)
    a, b = wide_reference.ravel(), wide_result.ravel()
    diff = a - b
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1 and np.issubdtype(reference.dtype, np.floating):
        top1 = float((reference.argmax(1) == result.argmax(1)).mean())
    return {"cosine": cosine, "rel_l2": float(_relative(np.linalg.norm(diff), np.linalg.norm(a))),
            "max_abs_diff": float(np.abs(diff).max()) if a.size else 0.0,
            "top1_agreement": top1, "channels": channel_fidelity(wide_reference, wide_result, axis)
            if np.issubdtype(reference.dtype, np.floating) else None}


def _relative(error, norm):
    """error / norm where the reference has any energy, else the error itself (element-wise)."""
    return np.divide(error, norm, out=np.array(error, dtype=np.float64), where=np.asarray(norm) > 0)


def channel_errors(reference: np.ndarray, result: np.ndarray, axis: int) -> np.ndarray:
    """The relative L2 error of every slice along `axis` (each channel over all samples and positions)."""
    channels = reference.shape[axis]
    a = np.moveaxis(reference.astype(np.float64, copy=False), axis, 0).reshape(channels, -1)
    b = np.moveaxis(result.astype(np.float64, copy=False), axis, 0).reshape(channels, -1)
    return _relative(np.linalg.norm(a - b, axis=1), np.linalg.norm(a, axis=1))


def channel_fidelity(reference: np.ndarray, result: np.ndarray, axis: int | None) -> dict | None:
    """The channel axis, its worst channels (index and relative L2 error, worst first) and the median
    error; None for an output without a channel axis (rank < 2 when no axis is given) or not floating."""
    if not np.issubdtype(reference.dtype, np.floating) or (axis is None and reference.ndim < 2):
        return None
    axis = 1 if axis is None else check_axis(axis, reference.ndim)
    errors = channel_errors(reference, result, axis)
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
    floating = [a.astype(np.float64) for a in reference.values()
                if np.issubdtype(a.dtype, np.floating) and a.ndim and len(a) > 1]
    return bool(floating) and all(np.abs(a - a[:1]).max() <= CONSTANT_SPREAD * np.abs(a).max() for a in floating)


def worst_channel(fidelity: dict) -> tuple[str, dict, dict] | None:
    """(output name, its worst channel {index, rel_l2}, the output's fidelity) over every output with a
    channel axis; None when none has one."""
    candidates = [(name, f["channels"]["worst"][0], f) for name, f in fidelity["per_output"].items()
                  if f.get("channels") and f["channels"]["worst"]]
    return max(candidates, key=lambda c: c[1]["rel_l2"], default=None)
