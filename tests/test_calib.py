"""Calibration data: every format, through the CLI and the Python API, and every bad-data case."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune import PruneConfig
from onnxprune.calib import input_specs, load_calibration
from onnxprune.calib.images import load_image_folder, parse_preprocess
from onnxprune.cli import main
from onnxprune.errors import DataError, UsageError
from onnxprune.loading import load
from tests import models

PIL = pytest.importorskip("PIL.Image", reason="image calibration needs Pillow (the 'images' extra)")

MNIST = "models/mnist_resnet.onnx"
FAST = ["--scorer", "l1", "--recover", "none", "--filters", "0.25", "-q"]


@pytest.fixture
def conv_model(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(models.conv_chain(seed=0), path)
    return path


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _report(path):
    return json.loads(path.read_text())


def _images(directory, count=3, size=(20, 24), suffix=".png"):
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        PIL.fromarray(pixels).save(directory / f"img{i}{suffix}")
    return directory


# ---------------------------------------------------------------- formats that work


def test_an_eval_directory_of_images_is_read_with_the_calibrations_preprocessing(conv_model, tmp_path):
    from onnxprune.baseline import prepare

    images = _images(tmp_path / "images", size=(32, 32))
    baseline = prepare(str(conv_model), PruneConfig(calibration=str(images), evaluation=str(images),
                                                    preprocess="imagenet,color=bgr"))
    assert baseline.evaluation.source == "evaluation"
    for name, values in baseline.calibration.arrays.items():
        np.testing.assert_array_equal(baseline.evaluation.arrays[name], values)


def test_npz_named_with_labels_and_sample_cap(tmp_path):
    result = _run([MNIST, tmp_path / "o.onnx", "--calib", "models/mnist_calib.npz", "--calib-samples", "40",
                   "--report", tmp_path / "r.json", *FAST])
    assert result.exit_code == 0, result.output
    report = _report(tmp_path / "r.json")
    # no fit used the data (l1, no recovery): nothing is held out
    assert report["data"] == {"source": "calibration", "samples": 40, "held_out": False, "in_sample": False}
    assert "accuracy" in report  # the labels came along


def test_npz_with_one_unnamed_array_and_npy(tmp_path):
    x = np.load("models/mnist_calib.npz")["input"][:16]
    np.savez(tmp_path / "unnamed.npz", x)
    np.save(tmp_path / "x.npy", x)
    for data in ("unnamed.npz", "x.npy"):
        result = _run([MNIST, tmp_path / "o.onnx", "--calib", tmp_path / data, "--report", tmp_path / "r.json", *FAST])
        assert result.exit_code == 0, result.output
        assert _report(tmp_path / "r.json")["data"]["samples"] == 16


def test_float64_data_is_cast_without_touching_the_callers_arrays():
    loaded = load(MNIST)
    specs = input_specs(loaded.model, loaded.input_shapes)
    arrays = {"input": np.zeros((2, 1, 28, 28), np.float64)}
    calibration = load_calibration(arrays, specs)
    assert calibration.arrays["input"].dtype == np.float32 and arrays["input"].dtype == np.float64


def test_image_directory_with_preset_and_options(tmp_path, conv_model):
    _images(tmp_path / "imgs", suffix=".png")
    _images(tmp_path / "imgs" / "more", count=2, suffix=".jpg")
    for spec in ("imagenet", "size=16x16,layout=nchw,color=bgr,scale=1/255,mean=0.5,std=0.25", "imagenet,resize=1"):
        result = _run([conv_model, tmp_path / "o.onnx", "--calib", tmp_path / "imgs", "--preprocess", spec,
                       "--report", tmp_path / "r.json", *FAST])
        assert result.exit_code == 0, result.output
        assert _report(tmp_path / "r.json")["data"]["samples"] == 5


def test_image_preprocessing_values(tmp_path):
    directory = tmp_path / "solid"
    directory.mkdir()
    PIL.fromarray(np.full((10, 30, 3), (255, 128, 0), np.uint8)).save(directory / "a.png")
    spec = input_specs(models.conv_chain(), {"x": [1, 3, 16, 16]})[0]
    rgb = load_image_folder(directory, spec, parse_preprocess("scale=1/255,mean=0.5,std=0.5"))
    assert rgb.shape == (1, 3, 16, 16) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0, :, 5, 5], [1.0, 128 / 255 * 2 - 1, -1.0], atol=1e-6)
    bgr = load_image_folder(directory, spec, parse_preprocess("imagenet-caffe"))
    np.testing.assert_allclose(bgr[0, :, 8, 8], [0 - 103.939, 128 - 116.779, 255 - 123.68], atol=1e-3)
    nhwc = type(spec)(spec.name, spec.dtype, [None, 12, 12, 3], [1, 12, 12, 3])
    assert load_image_folder(directory, nhwc, parse_preprocess("unit")).shape == (1, 12, 12, 3)


def test_data_loader_script(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent("""
        import numpy as np

        def feeds():
            data = np.load("models/mnist_calib.npz")["input"]
            for start in range(0, 24, 8):
                yield {"input": data[start:start + 8]}
    """))
    result = _run([MNIST, tmp_path / "o.onnx", "--data-loader-script", f"{script}:feeds", "--calib-batch", "5",
                   "--report", tmp_path / "r.json", "--recover", "none", "--filters", "0.25", "-q"])
    assert result.exit_code == 0, result.output
    report = _report(tmp_path / "r.json")
    assert report["data"]["samples"] + report["fidelity"]["in_sample"]["samples"] == 24
    assert report["scoring"]["scorer"] == "obs"


class Reader:
    """onnxruntime's CalibrationDataReader convention: get_next() returns a feed dict, then None."""

    def __init__(self, data):
        self.items = iter([{"input": data[i:i + 4]} for i in range(0, len(data), 4)])

    def get_next(self):
        return next(self.items, None)


@pytest.mark.parametrize("kind", ["reader", "list", "generator", "single samples", "dict"])
def test_python_api_sources(kind):
    data = np.load("models/mnist_calib.npz")["input"][:12]
    source = {
        "reader": Reader(data),
        "list": [{"input": data[i:i + 4]} for i in range(0, 12, 4)],
        "generator": ({"input": data[i:i + 6]} for i in range(0, 12, 6)),
        "single samples": [{"input": sample} for sample in data],  # no batch axis
        "dict": {"input": data},
    }[kind]
    result = onnxprune.prune(MNIST, PruneConfig(calibration=source, scorer="l1", recover="none", filters=0.25))
    assert result.report["data"]["samples"] == 12


# ---------------------------------------------------------------- bad data: one line, exit 3, names the input


def _bad(tmp_path, model, *args, code=3):
    result = _run([model, tmp_path / "o.onnx", *args, *FAST])
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not (tmp_path / "o.onnx").exists()
    return lines[0]


def test_missing_and_unreadable_files(tmp_path):
    assert "does not exist" in _bad(tmp_path, MNIST, "--calib", tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    assert "cannot read calibration data" in _bad(tmp_path, MNIST, "--calib", tmp_path / "junk.npz")


@pytest.mark.parametrize("case, arrays, expected", [
    ("wrong name", {"image": np.zeros((2, 1, 28, 28), np.float32), "other": np.zeros(2)}, "no array for input 'input'"),
    ("extra array", {"input": np.zeros((2, 1, 28, 28), np.float32), "extra": np.zeros(2)}, "match no model input"),
    ("wrong size", {"input": np.zeros((2, 1, 32, 32), np.float32)}, "input 'input' has size 32 on axis 2"),
    ("wrong rank", {"input": np.zeros((2, 28, 28), np.float32)}, "input 'input' has rank 3"),
    ("wrong dtype", {"input": np.zeros((2, 1, 28, 28), np.complex64)}, "input 'input' is complex64"),
    ("nan", {"input": np.full((2, 1, 28, 28), np.nan, np.float32)}, "input 'input' contains NaN or Inf"),
    ("inf", {"input": np.full((2, 1, 28, 28), np.inf, np.float32)}, "input 'input' contains NaN or Inf"),
    ("empty", {"input": np.zeros((0, 1, 28, 28), np.float32)}, "holds no samples"),
    ("labels", {"input": np.zeros((2, 1, 28, 28), np.float32), "labels": np.zeros(3)}, "'labels' has 3 entries"),
])
def test_bad_arrays(tmp_path, case, arrays, expected):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert expected in _bad(tmp_path, MNIST, "--calib", tmp_path / "bad.npz")


def test_bad_images(tmp_path, conv_model):
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _bad(tmp_path, conv_model, "--calib", tmp_path / "empty")
    _images(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert "cannot read image" in _bad(tmp_path, conv_model, "--calib", tmp_path / "imgs")
    mlp = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), mlp)
    assert "not an image batch" in _bad(tmp_path, mlp, "--calib", _images(tmp_path / "ok"))


def test_bad_loader_scripts(tmp_path):
    (tmp_path / "s.py").write_text(textwrap.dedent("""
        import numpy as np
        def raises():
            raise RuntimeError("disk on fire\\nsecond line of the message")
        def not_dicts():
            return [np.zeros((1, 1, 28, 28))]
        def wrong_name():
            return [{"image": np.zeros((1, 1, 28, 28), np.float32)}]
        def ragged():
            return [{"input": np.zeros((1, 1, 28, 28))}, {"input": np.zeros((1, 1, 14, 14))}]
        def nothing():
            return []
    """))
    script = tmp_path / "s.py"
    cases = {
        f"{tmp_path / 'missing.py'}:f": "does not exist",
        f"{script}:absent": "has no function 'absent'",
        f"{script}:raises": "disk on fire",
        f"{script}:not_dicts": "not a dict",
        f"{script}:wrong_name": "the model takes ['input']",
        f"{script}:ragged": "give every sample the same shape",
        f"{script}:nothing": "holds no samples",
    }
    for spec, expected in cases.items():
        assert expected in _bad(tmp_path, MNIST, "--data-loader-script", spec)


def test_usage_errors(tmp_path):
    np.savez(tmp_path / "c.npz", input=np.zeros((2, 1, 28, 28), np.float32))
    assert "not both" in _bad(tmp_path, MNIST, "--calib", tmp_path / "c.npz", "--data-loader-script", "x.py:f", code=2)
    assert "file.py:function" in _bad(tmp_path, MNIST, "--data-loader-script", "loader.py", code=2)
    assert "applies to a directory" in _bad(tmp_path, MNIST, "--calib", tmp_path / "c.npz", "--preprocess", "imagenet",
                                            code=2)
    (tmp_path / "imgs").mkdir()
    assert "not a preset" in _bad(tmp_path, MNIST, "--calib", tmp_path / "imgs", "--preprocess", "vgg", code=2)
    with pytest.raises(UsageError, match="bad value"):
        parse_preprocess("size=abc")
    with pytest.raises(DataError, match="not supported"):
        load_calibration(42, [])


def test_capture_streams_every_batch_and_leaves_the_model_as_it_was():
    """The requested tensors are graph outputs only while the session is built: the model's outputs are
    the same afterwards (no copy of the model is made for the capture), and every sample is captured once."""
    from onnxprune.calib import CalibrationSet
    from onnxprune.calib.capture import stream_activations

    model = models.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # a dynamic batch
    before = model.SerializeToString()
    inner = [n.output[0] for n in model.graph.node][:2]
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    batches = [dict(b) for b in stream_activations(model, inner, CalibrationSet({"x": x}), batch_size=2)]
    assert [len(b[inner[0]]) for b in batches] == [2, 2, 1]
    assert set(batches[0]) == set(inner)
    assert model.SerializeToString() == before


def test_an_endless_loader_is_stopped_with_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from onnxprune.cli import main
    from onnxprune.calib.data import MAX_FEED_SAMPLES

    script = tmp_path / "endless.py"
    script.write_text("import numpy as np\ndef data():\n    while True:\n        yield {'input': np.zeros((1, 1, 28, 28), np.float32)}\n")
    model = Path(__file__).resolve().parents[1] / "models" / "mnist_resnet.onnx"
    result = CliRunner().invoke(main, [str(model), str(tmp_path / "out.onnx"), "-q", "--data-loader-script", f"{script}:data"])
    assert result.exit_code == 3
    message = result.stderr.strip()
    assert message.startswith(f"error: {script}:data gave {MAX_FEED_SAMPLES + 1} samples (30 MB) and is still going")
    assert message.endswith("--calib-samples N") and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endless.py"]
