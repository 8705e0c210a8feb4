"""Directories of images as calibration data: decode, resize, crop, normalise, lay out.

Decoding uses Pillow, an optional dependency (`pip install 'onnxprune[images]'`): PNG and JPEG in all
their variants (progressive JPEG, palettes, 16-bit PNG, EXIF orientation) are too much to decode well
by hand, and every other calibration format needs no extra package.

`--preprocess` takes a preset name, `key=value` pairs, or a preset followed by overrides:
`imagenet`, `size=224,layout=nhwc,color=bgr,scale=1,mean=127.5,std=127.5`, `imagenet,size=192`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError, first_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] | None = None  # (height, width) fed to the model; None: the model's input shape
    resize: float = 1.0  # resize the shorter side to size * resize, then center-crop to size (1: resize only)
    layout: str | None = None  # "nchw" or "nhwc"; None: guessed from the model's input shape
    color: str = "rgb"  # "rgb", "bgr" or "gray"; a one-channel input always gets gray
    scale: float = 1.0 / 255.0  # pixel values 0..255 are multiplied by this first
    mean: tuple[float, ...] = (0.0,)  # then (x - mean) / std, per channel (one value: all channels)
    std: tuple[float, ...] = (1.0,)

    def describe(self) -> str:
        size = "model" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        return (f"size={size},resize={self.resize:g},layout={self.layout or 'auto'},color={self.color},"
                f"scale={self.scale:g},mean={'/'.join(f'{m:g}' for m in self.mean)},"
                f"std={'/'.join(f'{s:g}' for s in self.std)}")


PRESETS = {
    # torchvision's ImageNet convention: shorter side to 256 (for 224), center crop, RGB, [0,1], mean/std
    "imagenet": Preprocess(resize=256 / 224, color="rgb", scale=1 / 255,
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # Caffe-style ImageNet models: BGR, 0..255 minus the per-channel mean
    "imagenet-caffe": Preprocess(resize=256 / 224, color="bgr", scale=1.0, mean=(103.939, 116.779, 123.68), std=(1.0,)),
    # pixels scaled to [0, 1] and nothing else (the default for a directory without --preprocess)
    "unit": Preprocess(),
    # pixels scaled to [-1, 1] (MobileNet/Inception style)
    "symmetric": Preprocess(scale=1 / 127.5, mean=(1.0,), std=(1.0,)),
}


def parse_preprocess(text: str | Preprocess | None) -> Preprocess:
    """A `Preprocess` from a preset name and/or `key=value` pairs separated by commas."""
    if text is None:
        return PRESETS["unit"]
    if isinstance(text, Preprocess):
        return text
    result = PRESETS["unit"]
    for i, item in enumerate(p.strip() for p in text.split(",") if p.strip()):
        if "=" not in item:
            if i or item.lower() not in PRESETS:
                raise UsageError(f"--preprocess: '{item}' is not a preset ({', '.join(PRESETS)}) or a key=value "
                                 "pair (keys: size, resize, layout, color, scale, mean, std)")
            result = PRESETS[item.lower()]
            continue
        key, value = (s.strip().lower() for s in item.split("=", 1))
        result = _set(result, key, value)
    return result


def _set(pre: Preprocess, key: str, value: str) -> Preprocess:
    try:
        if key == "size":
            dims = [int(v) for v in value.replace("*", "x").split("x")]
            return replace(pre, size=(dims[0], dims[-1]))
        if key == "resize":
            return replace(pre, resize=float(value))
        if key == "layout" and value in ("nchw", "nhwc"):
            return replace(pre, layout=value)
        if key == "color" and value in ("rgb", "bgr", "gray"):
            return replace(pre, color=value)
        if key == "scale":
            num, _, den = value.partition("/")
            return replace(pre, scale=float(num) / float(den or 1))
        if key in ("mean", "std"):
            values = tuple(float(v) for v in value.replace(":", "/").split("/"))
            if key == "std" and any(v == 0 for v in values):
                raise ValueError("std must not be 0")
            return replace(pre, **{key: values})
    except (ValueError, IndexError) as exc:
        raise UsageError(f"--preprocess: bad value in '{key}={value}' ({exc})") from None
    raise UsageError(f"--preprocess: unknown key or value '{key}={value}' (keys: size=HxW, resize=F, "
                     "layout=nchw|nhwc, color=rgb|bgr|gray, scale=F, mean=A/B/C, std=A/B/C)")


def image_files(directory: Path) -> list[Path]:
    """Image files directly in `directory` or below, in sorted order (deterministic)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(directory: Path, spec, preprocess: Preprocess, limit: int | None = None) -> np.ndarray:
    """Every image of `directory` decoded and preprocessed into one array shaped like `spec`'s input."""
    layout, channels, size = _target(spec, preprocess, directory)
    files = image_files(directory)
    if not files:
        raise DataError(f"calibration directory '{directory}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                        "put images in it or give an .npz/.npy file")
    files = files[:limit] if limit else files
    Image = _pillow()
    batch = np.stack([_decode(Image, f, size, channels, preprocess) for f in files])  # [N, H, W, C] float32
    batch = _normalise(batch, preprocess, channels)
    if layout == "nchw":
        batch = batch.transpose(0, 3, 1, 2)
    log.info("read %d images from %s (%s)", len(files), directory, preprocess.describe())
    return np.ascontiguousarray(batch.astype(spec.dtype))


def _target(spec, preprocess: Preprocess, directory: Path):
    """(layout, channels, (height, width)) for the model input `spec`."""
    shape = spec.shape
    if len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
        raise DataError(f"input '{spec.name}' has shape {shape} and type {spec.dtype}, not an image batch: "
                        f"give an .npz or .npy file instead of the directory '{directory}'")
    layout = preprocess.layout or ("nchw" if shape[1] in (1, 3, 4) or shape[3] not in (1, 3, 4) else "nhwc")
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    if channels not in (1, 3):
        raise DataError(f"input '{spec.name}' has {channels} channels in layout {layout.upper()}: images give 1 or 3; "
                        "set --preprocess layout=nchw|nhwc or give an .npz file")
    size = preprocess.size or (height, width)
    dims = spec.dims
    fixed = (dims[2], dims[3]) if layout == "nchw" else (dims[1], dims[2])
    if any(f is not None and f != s for f, s in zip(fixed, size)):
        raise DataError(f"--preprocess size={size[0]}x{size[1]} does not fit input '{spec.name}' "
                        f"(it takes {fixed[0]}x{fixed[1]}): drop size= or set it to the model's")
    return layout, channels, size


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading a directory of images needs Pillow: pip install 'onnxprune[images]' "
                        "(or give the data as an .npz/.npy file)") from None
    return Image


def _decode(Image, path: Path, size: tuple[int, int], channels: int, pre: Preprocess) -> np.ndarray:
    """One image as float32 [H, W, C] in 0..255, resized (shorter side), center-cropped, in RGB/BGR/gray order."""
    try:
        with Image.open(path) as img:
            img = _upright(img)
            img = img.convert("L" if channels == 1 or pre.color == "gray" else "RGB")
            img = _resize_crop(Image, img, size, pre.resize)
            pixels = np.asarray(img, dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image '{path}' ({first_line(exc)}): "
                        "remove or replace the file") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pre.color == "bgr" and pixels.shape[2] == 3:
        pixels = pixels[:, :, ::-1]
    return pixels


def _upright(img):
    """Apply the EXIF orientation a camera recorded, as viewers do."""
    try:
        from PIL import ImageOps

        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop calibration
        return img


def _resize_crop(Image, img, size: tuple[int, int], resize: float):
    height, width = size
    if resize <= 1.0:
        return img.resize((width, height), Image.BILINEAR)
    short = max(height, width) * resize
    ratio = short / min(img.size)
    scaled = img.resize((max(width, round(img.size[0] * ratio)), max(height, round(img.size[1] * ratio))), Image.BILINEAR)
    left = (scaled.size[0] - width) // 2
    top = (scaled.size[1] - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _normalise(batch: np.ndarray, pre: Preprocess, channels: int) -> np.ndarray:
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    for name, values in (("mean", mean), ("std", std)):
        if values.size not in (1, channels):
            raise UsageError(f"--preprocess {name} has {values.size} values for {channels}-channel images: "
                             f"give 1 or {channels}")
    return (batch * np.float32(pre.scale) - mean) / std
