"""Rendered text lines for the CRNN benchmark (bench/train_crnn.py, bench/eval_crnn.py): random strings
of digits and lowercase letters drawn with the DejaVu fonts the machine has (PIL), in random font,
size, position and ink, with pixel noise. Sets are seeded: training, calibration and evaluation use disjoint
seeds, so no evaluated line was trained or calibrated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"  # class k + 1; class 0 is CTC's blank
HEIGHT, WIDTH = 32, 128
LENGTHS = (3, 8)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf")
MODEL = Path.home() / ".cache" / "onnxprune-bench" / "crnn.onnx"  # written by bench/train_crnn.py
SEEDS = {"train": 0, "calib": 1, "eval": 2}


def fonts() -> list[Path]:
    found = [FONT_DIR / name for name in FONT_NAMES if (FONT_DIR / name).is_file()]
    if not found:
        raise SystemExit(f"no DejaVu fonts under {FONT_DIR}: install fonts-dejavu-core")
    return found


def render(text: str, rng: np.random.Generator, font_files: list[Path]) -> np.ndarray:
    """One line as float32 [1, HEIGHT, WIDTH] in [0, 1] (ink bright on dark)."""
    size = int(rng.integers(15, 19))
    font = ImageFont.truetype(str(font_files[int(rng.integers(len(font_files)))]), size)
    image = Image.new("L", (WIDTH, HEIGHT), 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(1, WIDTH - (right - left) - 1))) - left
    y = int(rng.integers(0, max(1, HEIGHT - (bottom - top) - 1))) - top
    draw.text((x, y), text, fill=int(rng.integers(160, 256)), font=font)
    pixels = np.asarray(image, dtype=np.float32) / 255
    return np.clip(pixels + rng.normal(0, 0.05, pixels.shape), 0, 1).astype(np.float32)[None]


def strings(count: int, rng: np.random.Generator) -> list[str]:
    lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, size=count)
    return ["".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=n)) for n in lengths]


def lines(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`count` rendered lines [count, 1, HEIGHT, WIDTH] and their strings; `seed` fixes both."""
    rng = np.random.default_rng(seed)
    texts = strings(count, rng)
    font_files = fonts()
    return np.stack([render(t, rng, font_files) for t in texts]), texts


def decode(logits: np.ndarray) -> list[str]:
    """Greedy CTC decoding of [batch, steps, classes]: best class per step, repeats merged, blanks dropped."""
    best = logits.argmax(-1)
    out = []
    for row in best:
        merged = row[np.insert(row[1:] != row[:-1], 0, True)]
        out.append("".join(ALPHABET[k - 1] for k in merged if k > 0))
    return out
