"""bench/_sentences.py without the network: sentence splitting of reStructuredText prose and the agreement
measures of bench/eval_heads.py (per-sentence cosine, Spearman of pair similarities)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _sentences import agreement, ranks, split_sentences  # noqa: E402

PROSE = """\
.. _wine_dataset:

Wine recognition dataset
------------------------

:Number of Instances: 178

============ ====
Alcohol:     11.0
============ ====

The data is the result of a chemical analysis of wines grown in Italy. It was
used with many others for comparing classifiers, see :class:`~sklearn.svm.SVC` for one. Too short here.

    >>> load_wine().data.shape
    (178, 13)

- a bullet item that is long enough to be a sentence of its own.

Values 1, 2, 3, 4, 5, 6, 7, 8 and 9 are mostly digits.
"""


def test_split_keeps_prose_sentences_only():
    assert split_sentences(PROSE) == [
        "The data is the result of a chemical analysis of wines grown in Italy.",
        "It was used with many others for comparing classifiers, see sklearn.svm.SVC for one.",
    ]


def test_ranks_are_positions_in_sorted_order():
    assert ranks(np.array([0.3, 0.1, 0.2, 0.9])).tolist() == [2, 0, 1, 3]


def test_agreement_of_same_direction_is_one_and_drops_with_noise():
    original = np.random.default_rng(0).standard_normal((20, 8))
    assert np.allclose(agreement(original, 3 * original), (1.0, 1.0))
    noisy = original + np.random.default_rng(1).standard_normal((20, 8))
    cosine, spearman = agreement(original, noisy)
    assert 0.3 < cosine < 0.95 and 0.2 < spearman < 0.95


def test_spearman_is_minus_one_when_pair_similarities_reverse():
    def on_circle(angles):
        return np.stack([np.cos(angles), np.sin(angles)], 1)

    # pairs (0,1), (0,2), (1,2) at angles 0.5, 1.2, 0.7 apart rank 2, 0, 1; at 3.0, 0.38, 2.9 apart: 0, 2, 1
    assert np.isclose(agreement(on_circle(np.array([0.0, 0.5, 1.2])), on_circle(np.array([0.0, 3.0, 5.9])))[1], -1.0)
