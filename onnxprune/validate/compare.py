"""Run a model over calibration batches and compare outputs with the original's."""

from __future__ import annotations

import numpy as np

from ..progress import bar



def run_model(sess, calibration, batch_size: int, label: str = "onnxruntime run") -> dict[str, np.ndarray]:
    """All outputs over all samples, concatenated on axis 0 (scalars stacked)."""
    names = [o.name for o in sess.get_outputs()]
    collected = {n: [] for n in names}
    for feed in bar(calibration.batches(batch_size), label, total=-(-calibration.count // batch_size)):
        for name, value in zip(names, sess.run(names, feed)):
            collected[name].append(np.atleast_1d(value))
    return {n: np.concatenate(v) if v[0].ndim else np.stack(v) for n, v in collected.items()}


def output_fidelity(reference: np.ndarray, result: np.ndarray) -> dict:
    """cosine, relative L2 error and max |diff| over the whole output; top-1 agreement for [N, classes]."""
    a = reference.astype(np.float64).ravel()
    b = result.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
    ref_norm = np.linalg.norm(a)
    rel_l2 = float(np.linalg.norm(a - b) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(b))
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1 and np.issubdtype(reference.dtype, np.floating):
        top1 = float((reference.argmax(1) == result.argmax(1)).mean())
    return {"cosine": cosine, "rel_l2": rel_l2, "max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0,
            "top1_agreement": top1}


def fidelity(reference: dict[str, np.ndarray], result: dict[str, np.ndarray]) -> dict:
    """Fidelity of the first output at top level, and of every output under "per_output"."""
    per_output = {name: output_fidelity(reference[name], result[name]) for name in reference}
    first = next(iter(per_output.values()))
    return {**first, "per_output": per_output}
