"""Top-1 accuracy of an ONNX classifier on an .npz of labelled images, with onnxruntime.

Usage:

    python models/evaluate.py models/mnist_resnet.onnx models/mnist_eval.npz [more.npz ...]

Each .npz must hold "input" (already preprocessed float32, e.g. [N,1,28,28]) and
"labels" (int64 [N]).  The model's first input is fed "input" in batches and
its first output is taken as logits.  Needs only numpy and onnxruntime.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort


def accuracy(model_path: str, npz_path: str, batch_size: int = 250) -> tuple[int, int]:
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_name = sess.get_outputs()[0].name
    with np.load(npz_path) as data:
        x = data["input"].astype(np.float32, copy=False)
        y = data["labels"].astype(np.int64, copy=False)
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = sess.run([out_name], {in_name: x[i : i + batch_size]})[0]
        correct += int((logits.argmax(axis=1) == y[i : i + batch_size]).sum())
    return correct, len(y)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python models/evaluate.py MODEL.onnx DATA.npz [DATA.npz ...]", file=sys.stderr)
        return 2
    model_path = argv[0]
    for npz_path in argv[1:]:
        correct, total = accuracy(model_path, npz_path)
        print(f"{npz_path}: accuracy {correct / total:.4f} ({correct}/{total})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
