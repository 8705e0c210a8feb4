"""bench/_data.py's renders of sentences for the rotation classifiers (`eval_scoring.py --data renders`), without
the network: the splits read disjoint sentences, a seed fixes them, and the label is the clockwise angle."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

PIL = pytest.importorskip("PIL")

import _data  # noqa: E402
import _sentences  # noqa: E402
from _text import FONT_DIR  # noqa: E402

SENTENCES = [f"sentence number {i} with a few words in it." for i in range(40)]


@pytest.fixture
def renders(monkeypatch, tmp_path):
    if not (FONT_DIR / "DejaVuSans.ttf").is_file():
        pytest.skip("no DejaVu fonts")
    monkeypatch.setattr(_sentences, "sentences", lambda: list(SENTENCES))
    return lambda *args, **kw: (_data.write_renders(*args, **kw), args[0])


def _pixels(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_a_seed_fixes_the_renders_and_the_labels(renders, tmp_path):
    labels_a, a = renders(tmp_path / "a", "calib", 6, 4.0, (0, 180), seed=1)
    labels_b, b = renders(tmp_path / "b", "calib", 6, 4.0, (0, 180), seed=1)
    assert labels_a.tolist() == labels_b.tolist() and set(labels_a) <= {0, 1}
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))


def test_the_splits_read_disjoint_sentences(renders, tmp_path, monkeypatch):
    drawn = {"calib": set(), "eval": set()}
    split = {}
    from PIL import ImageDraw

    original_text = ImageDraw.ImageDraw.text

    def recording(self, xy, text, *args, **kwargs):
        drawn[split["now"]].update(text.split())
        return original_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recording)
    for name in drawn:
        split["now"] = name
        renders(tmp_path / name, name, 8, 1.0, (0,), seed=3)
    numbers = {k: {w for w in v if w.isdigit()} for k, v in drawn.items()}
    assert numbers["calib"] and numbers["eval"] and not numbers["calib"] & numbers["eval"]


def test_the_label_is_the_clockwise_angle(renders, tmp_path):
    from PIL import Image

    labels, turned = renders(tmp_path / "turned", "eval", 12, 4.0, (0, 90), seed=0)
    same, upright = renders(tmp_path / "upright", "eval", 12, 4.0, (0, 0), seed=0)  # the same draws, not turned
    assert labels.tolist() == same.tolist() and 0 < labels.sum() < 12
    for label, path, plain in zip(labels, sorted(turned.glob("*.png")), _pixels(upright)):
        back = np.asarray(Image.open(path).rotate(90 * label, expand=True))  # PIL turns counter-clockwise
        assert np.array_equal(back, plain)
