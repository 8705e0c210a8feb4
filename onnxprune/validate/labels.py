"""Labelled evaluation: accuracy and per-class recall before and after pruning, and recall distortion.

Recall distortion follows Good, Lin, Yu, Sieg, Fergurson, Zhe, Wieczorek and Serra, "Recall Distortion in
Neural Network Pruning and the Undecayed Pruning Algorithm" (NeurIPS 2022). Their intensification
hypothesis: pruning makes recall relatively worse for a class whose recall is below the model's accuracy,
and relatively better for a class whose recall is above it. "Relatively" is measured against accuracy,
through the normalised recall of class k, rho_k = recall_k / accuracy:

    delta_k = rho_k(after) / rho_k(before) - 1
            = (recall_k(after) / recall_k(before)) * (accuracy(before) / accuracy(after)) - 1

delta_k = 0: class k changed exactly as much as accuracy did; delta_k < 0: it lost relatively more.
Class k is *intensified* when its normalised recall moved away from 1 (below-accuracy class with
delta_k < 0, or above-accuracy class with delta_k > 0).

The one summary figure (our operationalisation of the paper's hypothesis, see docs/report-schema.md):

    intensification = mean(delta_k over classes with recall above accuracy)
                    - mean(delta_k over classes with recall below accuracy)

> 0: the intensification effect (weak classes lost relatively more); < 0: de-intensification (pruning
narrowed the gap between weak and strong classes); None when one side has no class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)
MOST_LOST_SHOWN = 3


def load_labels(source, count: int) -> np.ndarray:
    """Class indices from an .npy file, an .npz (`labels` array, or its only array) or an array-like."""
    if isinstance(source, (str, Path)):
        labels = _read_labels_file(Path(source))
        where = f"labels file '{source}'"
    else:
        labels, where = np.asarray(source), "the labels given"
    return as_class_indices(labels, count, where)


def _read_labels_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"labels file '{path}' does not exist: check the --labels path")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as data:
            if "labels" in data.files:
                return data["labels"]
            if len(data.files) == 1:
                return data[data.files[0]]
            raise DataError(f"labels file '{path}' has arrays {sorted(data.files)} but none named 'labels': name it so")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels file '{path}' ({exc}): give an .npy or an .npz with a 'labels' array") from None


def as_class_indices(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    """Integer class index per sample; one-hot rows [N, classes] are turned into indices."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = labels.argmax(axis=1)
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {list(labels.shape)}: give one class index per sample")
    if len(labels) != count:
        raise DataError(f"{where}: {len(labels)} labels for {count} evaluation samples: give one label per sample")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(labels == np.round(labels)):
            raise DataError(f"{where}: labels are {labels.dtype}, not class indices: give integers 0..classes-1")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: negative label {int(labels.min())}: give class indices 0..classes-1")
    return labels


def classifier_output(outputs: dict[str, np.ndarray]) -> str | None:
    """Name of the first output shaped [N, classes] with floating scores, or None."""
    for name, value in outputs.items():
        if value.ndim == 2 and value.shape[1] > 1 and np.issubdtype(value.dtype, np.floating):
            return name
    return None


def per_class_recall(predicted: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(recall per class, sample count per class); recall is NaN for a class with no sample."""
    counts = np.bincount(labels, minlength=classes)
    hits = np.bincount(labels[predicted == labels], minlength=classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / counts, counts


def recall_distortion(recall_before: np.ndarray, recall_after: np.ndarray,
                      accuracy_before: float, accuracy_after: float) -> dict:
    """delta_k per class and the intensification summary (see the module docstring)."""
    present = ~np.isnan(recall_before)
    comparable = present & (recall_before > 0) & (accuracy_after > 0) & (accuracy_before > 0)
    delta = np.full(recall_before.shape, np.nan)
    if comparable.any():  # none when accuracy after is 0 (the ratio of accuracies is undefined)
        delta[comparable] = (recall_after[comparable] / recall_before[comparable]) * (accuracy_before / accuracy_after) - 1
    below = comparable & (recall_before < accuracy_before)
    above = comparable & (recall_before > accuracy_before)
    intensified = (below & (delta < 0)) | (above & (delta > 0))
    mean_below = float(delta[below].mean()) if below.any() else None
    mean_above = float(delta[above].mean()) if above.any() else None
    figure = mean_above - mean_below if mean_below is not None and mean_above is not None else None
    return {
        "delta": delta,
        "intensified": intensified,
        "summary": {
            "intensification": figure,
            "mean_delta_below_accuracy": mean_below,
            "mean_delta_above_accuracy": mean_above,
            "classes_below_accuracy": int(below.sum()),
            "classes_above_accuracy": int(above.sum()),
            "intensified_classes": int(intensified.sum()),
            "intensified_fraction": float(intensified.sum() / (below | above).sum()) if (below | above).any() else None,
        },
    }


def labelled_evaluation(reference: dict[str, np.ndarray], result: dict[str, np.ndarray], labels: np.ndarray) -> dict | None:
    """Accuracy section of the report, from the first classifier-shaped output; None when there is none."""
    name = classifier_output(reference)
    if name is None:
        log.warning("labels given, but no output is shaped [batch, classes]: accuracy is not measured")
        return None
    return evaluate_labels(reference[name], result[name], labels, name)


def evaluate_labels(reference: np.ndarray, result: np.ndarray, labels: np.ndarray, output: str) -> dict:
    """Accuracy, per-class recall before/after and recall distortion, from [N, classes] scores."""
    classes = reference.shape[1]
    if labels.size and labels.max() >= classes:
        raise DataError(f"label {int(labels.max())} is out of range for output '{output}' with {classes} classes")
    before, after = reference.argmax(axis=1), result.argmax(axis=1)
    accuracy_before, accuracy_after = float((before == labels).mean()), float((after == labels).mean())
    recall_before, counts = per_class_recall(before, labels, classes)
    recall_after, _ = per_class_recall(after, labels, classes)
    distortion = recall_distortion(recall_before, recall_after, accuracy_before, accuracy_after)
    rows = _per_class_rows(counts, recall_before, recall_after, distortion, accuracy_before, accuracy_after)
    losers = sorted((r for r in rows if r["recall_change"] < 0), key=lambda r: (r["recall_change"], r["class"]))
    return {
        "output": output,
        "samples": int(len(labels)),
        "classes": int(classes),
        "before": accuracy_before,
        "after": accuracy_after,
        "drop": accuracy_before - accuracy_after,
        "per_class": rows,
        "distortion": {**distortion["summary"], "most_lost": [r["class"] for r in losers[:MOST_LOST_SHOWN]]},
    }


def _per_class_rows(counts, recall_before, recall_after, distortion, accuracy_before, accuracy_after) -> list[dict]:
    rows = []
    for k in np.flatnonzero(counts):
        delta = distortion["delta"][k]
        rows.append({
            "class": int(k),
            "samples": int(counts[k]),
            "recall_before": float(recall_before[k]),
            "recall_after": float(recall_after[k]),
            "recall_change": float(recall_after[k] - recall_before[k]),
            "below_accuracy": bool(recall_before[k] < accuracy_before),
            "relative_change": None if np.isnan(delta) else float(delta),
            "intensified": bool(distortion["intensified"][k]),
        })
    return rows
