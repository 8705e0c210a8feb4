"""Realistic inputs for the benchmarks: crops of the photos and scanned pages that ship in the
scikit-image wheel (read from the wheel itself, downloaded once with pip into the test-model cache).

Calibration and evaluation crops come from disjoint photos, so no evaluated picture was calibrated on.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.real_models import _download_wheel, cache_dir  # noqa: E402

SKIMAGE = "scikit-image==0.26.0"
PHOTOS = {
    "calib": ["astronaut.png", "coffee.png", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "color.png",
              "brick.png", "grass.png", "horse.png", "clock_motion.png"],
    "eval": ["chelsea.png", "rocket.jpg", "retina.jpg", "camera.png", "coins.png", "moon.png", "gravel.png",
             "cell.png", "logo.png"],
}
PAGES = {"calib": ["page.png"], "eval": ["text.png"]}


def _images(names: list[str]):
    from PIL import Image

    wheel = _download_wheel(SKIMAGE, cache_dir() / "wheels", 600)
    with zipfile.ZipFile(wheel) as archive:
        return [Image.open(io.BytesIO(archive.read(f"skimage/data/{n}"))).convert("RGB") for n in names]


def write_crops(directory: Path, split: str, count: int, aspect: float = 1.0, kind: str = "photos",
                rotations: tuple[int, ...] = (0,), seed: int = 0, side: int = 256) -> Path:
    """`count` random crops (width / height = `aspect`, 30-100% of the picture's height) of the
    `split` ("calib" or "eval") photos or pages, each turned by a random multiple of 90 degrees from
    `rotations`, saved as PNG files whose longer side is at most `side` pixels."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    sources = _images((PHOTOS if kind == "photos" else PAGES)[split])
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = sources[i % len(sources)]
        width, height = image.size
        crop_h = int(height * rng.uniform(0.3, 1.0))
        crop_w = min(width, max(8, int(crop_h * aspect)))
        crop_h = min(crop_h, max(8, int(crop_w / aspect)))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        crop = image.crop((left, top, left + crop_w, top + crop_h))
        crop = crop.rotate(int(rng.choice(rotations)), expand=True)
        scale = side / max(crop.size)
        if scale < 1:
            crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))),
                               Image.BILINEAR)
        crop.save(directory / f"{i:04d}.png")
    return directory


RENDER_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
                "DejaVuSansCondensed.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSans-Oblique.ttf")


def write_renders(directory: Path, split: str, count: int, aspect: float = 1.0, rotations: tuple[int, ...] = (0,),
                  seed: int = 0, side: int = 256) -> np.ndarray:
    """`count` renders of real English sentences (bench/_sentences.py: the scikit-learn wheel's prose; "calib"
    and "eval" take disjoint halves of the sentences) in darker ink on lighter paper, DejaVu fonts of random face and
    size, as photographed (a slight skew, blur, uneven light, noise), each turned clockwise by a random angle of `rotations` (the rotation
    classifiers' convention), saved as PNG files. aspect >= 2: one
    text line as a text detector would crop it (width / height = `aspect`); below: a block of wrapped lines
    (width / height = `aspect`, longer side `side`). Returns the index in `rotations` of each render's angle."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    from _sentences import sentences
    from _text import FONT_DIR

    pool = sentences()[{"calib": 0, "eval": 1}[split]::2]
    faces = [FONT_DIR / name for name in RENDER_FONTS if (FONT_DIR / name).is_file()]
    if not faces:
        raise SystemExit(f"no DejaVu fonts under {FONT_DIR}: install fonts-dejavu-core")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(rotations), size=count)
    for i in range(count):
        words = " ".join(pool[int(j)] for j in rng.integers(len(pool), size=8)).split()
        start = int(rng.integers(max(1, len(words) - 40)))
        paper = int(rng.integers(150, 256))
        ink = int(rng.integers(0, paper - 40))
        face = str(faces[int(rng.integers(len(faces)))])
        if aspect >= 2:
            height = 48
            width = int(height * aspect)
            font = ImageFont.truetype(face, int(rng.integers(18, 40)))
            lines, top = [" ".join(words[start:start + 30])], (height - font.size) // 2 - 4
        else:
            width, height = (side, int(side / aspect)) if aspect >= 1 else (int(side * aspect), side)
            font = ImageFont.truetype(face, int(rng.integers(8, 28)))
            lines, line, top = [], "", int(rng.integers(2, height // 2))
            for word in words[start:]:  # wrap to the width
                if font.getlength(f"{line} {word}") > width - 8 and line:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            lines = lines[:int(rng.integers(2, len(lines) + 2))]  # a block of a few lines or a page's worth
        image = Image.new("L", (width, height), paper)
        draw = ImageDraw.Draw(image)
        left = int(rng.integers(2, 12))
        for k, text in enumerate(lines):
            draw.text((left, top + int(k * font.size * 1.3)), text, fill=ink, font=font)
        # as photographed: a slight skew, blur, uneven light and sensor noise
        image = image.rotate(float(rng.uniform(-3, 3)), resample=Image.BILINEAR, fillcolor=paper)
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))
        light = np.linspace(float(rng.uniform(0.7, 1.0)), 1.0, width)[None, :]
        noise = rng.normal(0, float(rng.uniform(2, 16)), (height, width))
        pixels = np.asarray(image, dtype=np.float32) * light + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
        image.rotate(-int(rotations[labels[i]]), expand=True).save(directory / f"{i:04d}.png")
    return labels
