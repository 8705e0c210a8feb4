"""bench/_task_metrics.py (greedy CTC decoding, DB boxes and their one-to-one matching) and bench/_op_profile.py's
reading of a profile (warm-up runs left out, the median run per op type), on made-up outputs and events."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _op_profile import per_op  # noqa: E402
from _task_metrics import ctc_sequences, detector_metrics, matched, recognizer_metrics, top1_metrics  # noqa: E402


def one_hot(indices, classes=5):
    return np.eye(classes)[np.array(indices)]


def test_ctc_merges_repeats_and_drops_blanks():
    steps = one_hot([[1, 1, 0, 1, 2, 2, 0, 0], [0, 3, 3, 3, 0, 0, 0, 4]])
    assert ctc_sequences(steps) == [(1, 1, 2), (3, 4)]


def test_recognizer_exact_match_counts_decoded_sequences_not_steps():
    reference = one_hot([[1, 1, 0, 2], [3, 0, 0, 4]])
    pruned = one_hot([[1, 0, 0, 2], [3, 0, 4, 4]])  # same sequences, two steps differ; then one sequence differs
    assert recognizer_metrics(reference, pruned) == {"step agreement": 0.75, "exact match": 1.0}
    assert recognizer_metrics(reference, one_hot([[1, 1, 0, 2], [3, 3, 0, 0]]))["exact match"] == 0.5


def test_detector_boxes_from_the_map_matched_at_iou_half():
    pytest.importorskip("cv2")
    reference = np.zeros((1, 1, 40, 40))
    reference[0, 0, 2:10, 2:20] = 0.9  # a text box
    reference[0, 0, 20:30, 5:15] = 0.9  # another
    reference[0, 0, 35:37, 30:39] = 0.9  # 2 pixels high: dropped
    reference[0, 0, 32:39, 2:10] = 0.4  # above the binarization, below the box score: dropped
    assert detector_metrics(reference, reference) == {"F1": 1.0, "precision": 1.0, "recall": 1.0, "boxes": 2}
    pruned = np.zeros_like(reference)
    pruned[0, 0, 2:10, 2:19] = 0.8  # the first box, slightly shorter: matched
    pruned[0, 0, 20:30, 12:22] = 0.8  # the second moved by 7 of its 10 columns: IoU 0.18, not matched
    assert detector_metrics(reference, pruned) == {"F1": 0.5, "precision": 0.5, "recall": 0.5, "boxes": 2}


def test_boxes_match_one_to_one():
    reference = np.array([[0, 0, 10, 10]])
    assert matched(reference, np.array([[0, 0, 10, 10], [0, 0, 10, 9]])) == 1
    assert matched(reference, np.zeros((0, 4))) == 0


def test_top1_agreement():
    reference = np.array([[0.1, 0.9], [0.8, 0.2], [0.45, 0.55]])
    pruned = np.array([[0.2, 0.7], [0.1, 0.3], [0.6, 0.4]])  # the third flips where the original was unsure
    assert top1_metrics(reference, pruned) == {"top-1 agreement": pytest.approx(1 / 3), "where sure": 0.5, "sure": 2}


def test_profile_per_op_type_leaves_out_warmup_and_takes_the_median_run():
    events = []
    for run, (conv_us, add_us) in enumerate([(900, 90), (100, 10), (120, 12), (110, 11)]):
        start = run * 10_000
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": conv_us + add_us + 50})
        conv = {"op_name": "Conv", "input_type_shape": [{"float": [1, 4, 8, 8]}, {"float": [8, 4, 3, 3]}],
                "output_type_shape": [{"float": [1, 8, 8, 8]}]}
        add = {"op_name": "Add", "input_type_shape": [{"float": [1, 8, 8, 8]}] * 2, "output_type_shape": [{"float": [1, 8, 8, 8]}]}
        events.append({"cat": "Node", "name": "c_kernel_time", "ts": start + 1, "dur": conv_us, "args": conv})
        events.append({"cat": "Node", "name": "a_kernel_time", "ts": start + 2, "dur": add_us, "args": add})
        events.append({"cat": "Node", "name": "a_fence_before", "ts": start + 3, "dur": 5, "args": add})
    times = per_op(events, warmup=1)
    assert times["Conv kxk"] == (0.11, "MACs", 512 * 36)
    assert times["Add"] == (0.011, "elements", 512)
    assert times["(outside kernels)"][0] == pytest.approx(0.05)


def test_no_boxes_in_either_model_is_agreement():
    pytest.importorskip("cv2")
    empty = np.zeros((2, 1, 32, 32), dtype=np.float32)
    assert detector_metrics(empty, empty) == {"F1": 1.0, "precision": 1.0, "recall": 1.0, "boxes": 0}
