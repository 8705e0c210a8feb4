"""Train a small CRNN text recognizer on rendered lines (bench/_text.py) and export it to ONNX, for
bench/eval_crnn.py. Run with the training venv (torch):

    /work/venv-train/bin/python bench/train_crnn.py [--minutes 8] [--out ~/.cache/onnxprune-bench/crnn.onnx]

The model: five 3x3 Conv + BatchNorm + ReLU (32, 64, 128, 128, 256 channels; max-pools to height 2),
the mean over the height, two bidirectional LSTMs (hidden 128), a linear classifier over 36 characters
and CTC's blank; input [N, 1, 32, 128], output logits [N, 32 steps, 37]. Trained with CTC loss and Adam
for a fixed wall-clock time on lines drawn afresh every step (--resume continues from the saved
weights); the exact-match accuracy on 500 held-out lines (the evaluation seed) is printed before export.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _text import ALPHABET, MODEL, SEEDS, decode, fonts, lines, render, strings  # noqa: E402


class CRNN(nn.Module):
    def __init__(self, classes: int = len(ALPHABET) + 1, hidden: int = 128):
        super().__init__()
        layers, channels = [], 1
        for width, pool in ((32, (2, 2)), (64, (2, 2)), (128, None), (128, (2, 1)), (256, (2, 1))):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(pool))
            channels = width
        self.convs = nn.Sequential(*layers)
        self.rnn = nn.LSTM(channels, hidden, num_layers=2, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        features = self.convs(x).mean(2).permute(2, 0, 1)  # [steps, N, channels]
        return self.classifier(self.rnn(features)[0]).transpose(0, 1)  # batch first, as onnxprune's outputs


def batch(size: int, rng: np.random.Generator, font_files) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    texts = strings(size, rng)
    images = torch.from_numpy(np.stack([render(t, rng, font_files) for t in texts]))
    targets = torch.tensor([ALPHABET.index(c) + 1 for t in texts for c in t])
    return images, targets, torch.tensor([len(t) for t in texts])


def accuracy(model: CRNN, images: np.ndarray, texts: list[str]) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(images[i:i + 100])) for i in range(0, len(images), 100)])
    model.train()
    return float(np.mean([a == b for a, b in zip(decode(logits.numpy()), texts)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=MODEL)
    parser.add_argument("--resume", action="store_true", help="continue from the weights saved next to --out "
                        "(with --minutes 0: only evaluate and export them)")
    args = parser.parse_args()
    weights = args.out.with_suffix(".pt")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a shared machine: a second thread mostly waits for the first
    rng, font_files = np.random.default_rng(SEEDS["train"]), fonts()
    held_images, held_texts = lines(500, SEEDS["eval"])
    model = CRNN()
    if args.resume:
        model.load_state_dict(torch.load(weights))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    start, step = time.monotonic(), 0
    deadline = start + 60 * args.minutes
    while time.monotonic() < deadline and args.minutes > 0:
        images, targets, lengths = batch(args.batch, rng, font_files)
        log_probs = model(images).transpose(0, 1).log_softmax(-1)  # CTC's [steps, N, classes]
        steps = torch.full((args.batch,), log_probs.shape[0], dtype=torch.long)
        loss = ctc(log_probs, targets, steps, lengths)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}  {time.monotonic() - start:6.0f} s  loss {loss.item():.3f}", flush=True)
        if step % 500 == 0:
            print(f"  held-out exact match {accuracy(model, held_images[:200], held_texts[:200]):.3f}", flush=True)
    print(f"{step} steps in {time.monotonic() - start:.0f} s; held-out exact match "
          f"{accuracy(model, held_images, held_texts):.3f} on {len(held_texts)} lines")
    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    partial = args.out.with_suffix(".partial")
    torch.onnx.export(model, torch.from_numpy(held_images[:2]), str(partial), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17,
                      dynamo=False)
    partial.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
