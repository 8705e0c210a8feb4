"""The CRNN text recognizer of bench/train_crnn.py (conv stack, two bidirectional LSTMs, CTC) pruned to a
fraction of its MACs, and the coverage of the voice-activity model (LSTM with its state passed in and out).

Per setting (scorer, --target-macs, calibration lines, lstsq recovery, which re-fits the LSTMs' input
weights and the classifier): the MACs kept, the hidden units kept per LSTM, the exact-match accuracy
(greedy CTC decoding) on held-out rendered lines no one trained or calibrated on, against the
original's on the same lines, and the share of lines read exactly as the original reads them.
Calibration lines and evaluation lines come from disjoint seeds.

    /work/venv-train/bin/python bench/train_crnn.py      # once: writes ~/.cache/onnxprune-bench/crnn.onnx
    python bench/eval_crnn.py [--macs 0.7,0.5] [--scorers obs,wanda] [--recover lstsq] [--calib 256]
                              [--eval 500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxprune  # noqa: E402
from onnxprune import PruneConfig  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from tests.real_models import fetch, input_shapes  # noqa: E402
from _text import HEIGHT, MODEL, SEEDS, WIDTH, decode, lines  # noqa: E402

SHAPES = {"image": [1, 1, HEIGHT, WIDTH]}


def read(model, images: np.ndarray) -> list[str]:
    sess = session(model)
    return decode(np.concatenate([sess.run(None, {"image": images[i:i + 100]})[0] for i in range(0, len(images), 100)]))


def matches(found: list[str], texts: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(found, texts)]))


def lstm_units(groups: list[dict], key: str) -> str:
    return "/".join(str(g.get(key, g["channels"])) for g in groups if "lstm" in g["name"].lower())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--macs", default="0.7,0.5")
    parser.add_argument("--scorers", default="obs,wanda")
    parser.add_argument("--recover", default="lstsq", help="recovery methods, comma-separated (e.g. none,lstsq)")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=500)
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model} is missing: train it first (/work/venv-train/bin/python bench/train_crnn.py)")
    vad = onnxprune.inspect(str(fetch("silero_vad")), input_shapes("silero_vad"))
    print(f"voice-activity model (silero_vad): coverage {vad['coverage']:.1%}, "
          f"{sum(g['prunable'] for g in vad['groups'])} of {len(vad['groups'])} groups prunable")
    info = onnxprune.inspect(str(args.model), SHAPES)
    blocked = [g["name"] for g in info["groups"] if not g["prunable"]]
    units = lstm_units(info["groups"], "channels")
    print(f"CRNN: coverage {info['coverage']:.1%}, {len(info['groups']) - len(blocked)} of {len(info['groups'])} "
          f"groups prunable (left whole: {', '.join(blocked) or 'none'}), LSTM hidden units {units}")
    calib_images, _ = lines(args.calib, SEEDS["calib"])
    eval_images, eval_texts = lines(args.eval, SEEDS["eval"])
    original = read(str(args.model), eval_images)
    print(f"\n{'setting':<24}{'MACs kept':>10}{'LSTM units':>12}{'exact match':>13}{'same as original':>18}")
    print(f"{'original':<24}{1:>10.1%}{units:>12}{matches(original, eval_texts):>13.3f}{1:>18.3f}", flush=True)
    settings = [(scorer, float(fraction), recover) for scorer in args.scorers.split(",")
                for fraction in args.macs.split(",") for recover in args.recover.split(",")]
    for scorer, fraction, recover in settings:
        result = onnxprune.prune(str(args.model), PruneConfig(
            target_macs=fraction, scorer=scorer, recover=recover, calibration={"image": calib_images},
            input_shapes=SHAPES))
        report = result.report
        kept = report["after"]["macs"] / report["before"]["macs"]
        found = read(result.model, eval_images)
        print(f"{f'{scorer} MACs {fraction:.0%} {recover}':<24}{kept:>10.1%}"
              f"{lstm_units(report['groups'], 'channels_after'):>12}{matches(found, eval_texts):>13.3f}"
              f"{matches(found, original):>18.3f}", flush=True)


if __name__ == "__main__":
    main()
