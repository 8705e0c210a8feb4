"""Labelled evaluation: accuracy, per-class recall and the recall-distortion figure."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune.cli import main
from onnxprune.errors import DataError
from onnxprune.validate.labels import evaluate_labels, load_labels, recall_distortion

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


def scores_for(predictions: np.ndarray, classes: int) -> np.ndarray:
    """Logits whose argmax is `predictions`."""
    logits = np.zeros((len(predictions), classes), dtype=np.float32)
    logits[np.arange(len(predictions)), predictions] = 1.0
    return logits


def predictions_with_recall(labels: np.ndarray, correct_per_class: list[int]) -> np.ndarray:
    """Predict the first `correct_per_class[k]` samples of class k right and the rest as class (k+1) % C."""
    classes = len(correct_per_class)
    predicted = (labels + 1) % classes
    for k, correct in enumerate(correct_per_class):
        predicted[np.flatnonzero(labels == k)[:correct]] = k
    return predicted


def test_recall_distortion_matches_the_hand_computed_case():
    """Three classes of 10: recalls 1.0, 0.9, 0.5 (accuracy 0.8) -> 1.0, 0.8, 0.2 (accuracy 2/3).
    delta = (r'/a') / (r/a) - 1 = 0.2, 0.0667, -0.52; intensification = mean(0.2, 0.0667) - (-0.52)."""
    labels = np.repeat(np.arange(3), 10)
    before = scores_for(predictions_with_recall(labels, [10, 9, 5]), 3)
    after = scores_for(predictions_with_recall(labels, [10, 8, 2]), 3)
    section = evaluate_labels(before, after, labels, "logits")
    assert section["before"] == pytest.approx(0.8) and section["after"] == pytest.approx(2 / 3)
    assert section["drop"] == pytest.approx(0.8 - 2 / 3)
    rows = section["per_class"]
    assert [r["recall_before"] for r in rows] == pytest.approx([1.0, 0.9, 0.5])
    assert [r["recall_after"] for r in rows] == pytest.approx([1.0, 0.8, 0.2])
    assert [r["relative_change"] for r in rows] == pytest.approx([0.2, 0.8 / 0.9 * 1.2 - 1, -0.52])
    assert [r["below_accuracy"] for r in rows] == [False, False, True]
    assert [r["intensified"] for r in rows] == [True, True, True]
    distortion = section["distortion"]
    assert distortion["mean_delta_above_accuracy"] == pytest.approx((0.2 + 0.8 / 0.9 * 1.2 - 1) / 2)
    assert distortion["mean_delta_below_accuracy"] == pytest.approx(-0.52)
    assert distortion["intensification"] == pytest.approx(0.653333, abs=1e-6)
    assert distortion["intensified_fraction"] == pytest.approx(1.0)
    assert distortion["most_lost"] == [2, 1]


def test_de_intensification_is_negative():
    """The weak class gains while the strong ones lose relative to accuracy: the figure is negative.
    a = 0.8 -> 0.8667; delta = 0.8*0.8/0.8667-1, 0.8/0.8667-1, 2*0.8/0.8667-1 = -0.2615, -0.0769, 0.8462."""
    result = recall_distortion(np.array([1.0, 1.0, 0.4]), np.array([0.8, 1.0, 0.8]), 0.8, 0.8667)
    ratio = 0.8 / 0.8667
    expected = ((0.8 * ratio - 1) + (ratio - 1)) / 2 - (2 * ratio - 1)
    assert result["summary"]["intensification"] == pytest.approx(expected) and expected < -1
    assert result["summary"]["intensified_classes"] == 0


def test_unchanged_model_has_no_distortion():
    labels = np.repeat(np.arange(4), 5)
    scores = scores_for(predictions_with_recall(labels, [5, 4, 3, 2]), 4)
    distortion = evaluate_labels(scores, scores, labels, "y")["distortion"]
    assert distortion["intensification"] == pytest.approx(0.0)
    assert distortion["intensified_classes"] == 0 and distortion["most_lost"] == []


def test_classes_without_samples_are_left_out_and_zero_recall_has_no_relative_change():
    labels = np.array([0, 0, 2, 2])
    before = scores_for(np.array([0, 0, 1, 1]), 3)  # class 2 recall 0 before
    after = scores_for(np.array([0, 1, 2, 1]), 3)
    section = evaluate_labels(before, after, labels, "y")
    assert [r["class"] for r in section["per_class"]] == [0, 2]
    assert section["per_class"][1]["relative_change"] is None


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_other_name", "onehot"])
def test_labels_load_from_files(tmp_path, kind):
    labels = np.array([3, 1, 2, 0])
    if kind == "npy":
        path = tmp_path / "l.npy"
        np.save(path, labels)
    elif kind == "npz":
        path = tmp_path / "l.npz"
        np.savez(path, labels=labels, other=np.zeros(2))
    elif kind == "npz_other_name":
        path = tmp_path / "l.npz"
        np.savez(path, y=labels)
    else:
        path = tmp_path / "l.npy"
        np.save(path, np.eye(4)[labels])
    np.testing.assert_array_equal(load_labels(path, 4), labels)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), "3 labels for 4"),
    (np.array([0.5, 1, 2, 3]), "not class indices"),
    (np.array([0, -1, 2, 3]), "negative"),
])
def test_bad_labels_are_refused_with_a_reason(labels, message):
    with pytest.raises(DataError, match=message):
        load_labels(labels, 4)


def test_cli_labels_file_gives_accuracy_and_per_class_table(tmp_path):
    """Labels from --labels override the npz's own: shuffled labels give a low accuracy."""
    with np.load(CALIB) as data:
        true_labels = data["labels"]
    shuffled = tmp_path / "shuffled.npy"
    np.save(shuffled, np.roll(true_labels, 1))
    out, report, summary = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "s.md"
    result = CliRunner().invoke(main, [str(MODEL), str(out), "--filters", "0.25", "--eval", str(CALIB),
                                       "--report", str(report), "--summary-md", str(summary)])
    assert result.exit_code == 0, result.output
    own = json.loads(report.read_text())["accuracy"]
    assert own["before"] == pytest.approx(251 / 256)  # models/README.md: 98.05 % on the calibration split
    assert len(own["per_class"]) == 10 and sum(r["samples"] for r in own["per_class"]) == 256
    assert "accuracy" in result.output and "recall distortion" in result.output
    assert "| class | samples |" in summary.read_text()

    result = CliRunner().invoke(main, [str(MODEL), str(out), "--filters", "0.25", "--eval", str(CALIB),
                                       "--labels", str(shuffled), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["accuracy"]["before"] < 0.3


def test_cli_labels_of_the_wrong_length_exit_3(tmp_path):
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(10, dtype=np.int64))
    result = CliRunner().invoke(main, [str(MODEL), str(tmp_path / "o.onnx"), "--eval", str(CALIB), "--labels", str(short)])
    assert result.exit_code == 3 and "10 labels for 256" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_cli_labels_without_real_inputs_is_a_usage_error(tmp_path):
    labels = tmp_path / "l.npy"
    np.save(labels, np.zeros(8, dtype=np.int64))
    result = CliRunner().invoke(main, [str(MODEL), str(tmp_path / "o.onnx"), "--labels", str(labels)])
    assert result.exit_code == 2 and "--labels needs" in result.output


def test_a_result_that_gets_every_sample_wrong_has_no_relative_change():
    """Accuracy after 0 (a small held-out set can show it): delta is undefined, not a division by zero."""
    labels = np.array([0, 0, 1, 1])
    section = evaluate_labels(scores_for(labels, 2), scores_for(1 - labels, 2), labels, "y")
    assert section["after"] == 0.0 and section["distortion"]["intensification"] is None
    assert all(r["relative_change"] is None for r in section["per_class"])
