"""Attention heads and FFN neurons of the public MiniLM-L3 sentence encoder (3 layers, 12 heads of 32,
FFN 1536), as exported (plain) and as fused by `onnxruntime.transformers.optimizer` (Attention,
SkipLayerNormalization, BiasGelu; the fusion needs sympy: without it that row says so and is skipped).

Per graph: coverage and the prunable heads and FFN neurons (`onnxprune inspect`, also with `--hidden`);
then for each scorer (obs, which allocates by error per MAC; wanda, at one ratio for every group) at each
fraction of MACs kept (--target-macs, calibration inputs, lstsq recovery), without and with `--hidden`
(the residual width pruned too): the heads, FFN neurons and hidden size kept, the cosine of the sentence
embedding (the mean-pooled output; with --hidden its removed dimensions are zeros) on held-out inputs
(over the whole output, and the mean of each sentence's), the Spearman correlation of the similarities of every pair of held-out inputs
(original against pruned), and onnxruntime latency at sequence length 128 (1 thread, median of 30 runs,
original and pruned timed in alternation).

Inputs (--text): real English sentences of the scikit-learn wheel, tokenized by the model's WordPiece
tokenizer (bench/_sentences.py; needs `tokenizers`, the bench extra), disjoint calibration and evaluation
sets; or random token ids framed by [CLS] and [SEP], 16 long. Real is the default when its tokenizer and
text can be had; otherwise the script says why and uses random ids.

    python bench/eval_heads.py [--macs 0.7,0.5] [--scorers obs,wanda] [--hidden off,on] [--graphs plain,fused]
                               [--calib-samples 128] [--eval-samples 64] [--text real|random]
                               [--model PATH --name NAME]

--model evaluates another encoder with inputs `input_ids` and `attention_mask` (hidden 384, 12 heads, e.g.
the one bench/export_bert.py writes) instead of MiniLM-L3; its first output is the sentence embedding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxprune  # noqa: E402
from onnxprune import PruneConfig  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from onnxprune.validate.latency import LatencyConfig, summarize, time_runs  # noqa: E402
from tests.real_models import fetch, input_shapes  # noqa: E402

import _sentences  # noqa: E402

LENGTH, LATENCY_LENGTH = 16, 128
EMBEDDING = "461"  # the mean-pooled sentence embedding [batch, 384]; --model: that model's first output


def tokens(count: int, length: int, seed: int) -> dict:
    ids = np.random.default_rng(seed).integers(1000, 20000, size=(count, length))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def inputs(text: str | None, calib_samples: int, eval_samples: int) -> tuple[dict, dict, str]:
    """Calibration and evaluation feeds and what they are: real sentences unless `text` is "random"
    (when `text` is None and real ones cannot be had, random ids, saying why)."""
    why = ""
    if text != "random":
        try:
            calibration, evaluation, _ = _sentences.feeds(calib_samples, eval_samples)
            return calibration, evaluation, f"real sentences, padded to {calibration['input_ids'].shape[1]} tokens"
        except _sentences.TextUnavailable as error:
            if text == "real":
                raise SystemExit(f"--text real: {error}") from None
            why = f" (no real sentences: {error})"
    return tokens(calib_samples, LENGTH, seed=0), tokens(eval_samples, LENGTH, seed=1), f"random token ids{why}"


def embeddings(model, feed: dict) -> np.ndarray:
    return session(model, threads=1).run([EMBEDDING], feed)[0]


def fused(path: Path, work: Path) -> tuple[Path | None, str]:
    """The graph fused by onnxruntime's transformer optimizer, or None and why not."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    except ImportError as error:
        return None, f"the fusion needs {error.name or error} "
    out = work / f"{path.stem}_fused.onnx"
    optimized.save_model_to_file(str(out))
    return out, ""


def units(groups: list[dict], kind: str, key: str) -> int:
    """Heads (attention groups), the hidden size (the group of the embedding) or FFN neurons (the other
    prunable groups), before or after."""
    def kind_of(group):
        name = group["name"].lower()
        return "heads" if "attention" in name else "hidden" if "embed" in name else "ffn"
    return sum(g.get(key, g["channels"]) for g in groups if g["prunable"] and kind_of(g) == kind)


def counts(groups: list[dict], key: str) -> str:
    return "".join(f"{units(groups, kind, key):>7}" for kind in ("heads", "ffn", "hidden"))


def latency(original, pruned) -> tuple[float, float]:
    feed = tokens(1, LATENCY_LENGTH, seed=3)
    times = time_runs({"before": session(original, threads=1), "after": session(pruned, threads=1)}, feed,
                      LatencyConfig(threads=1))
    return summarize(times["before"])["median_ms"], summarize(times["after"])["median_ms"]


def rows(name: str, path: Path, macs: list[float], scorers: list[str], hidden: list[bool], calibration: dict,
         evaluation: dict):
    length = calibration["input_ids"].shape[1]
    shapes = {"input_ids": [1, length], "attention_mask": [1, length]}
    for opt_in in hidden:
        info = onnxprune.inspect(str(path), shapes, hidden=opt_in)
        setting = "inspect --hidden" if opt_in else "inspect"
        yield f"{name:<12}{setting:>20}{info['coverage']:>10.1%}{counts(info['groups'], 'channels')}"
    data = dict(calibration=calibration, evaluation=evaluation, input_shapes=shapes)
    original = embeddings(str(path), evaluation)
    for scorer in scorers:
        for fraction in macs:
            for opt_in in hidden:
                result = onnxprune.prune(str(path), PruneConfig(target_macs=fraction, scorer=scorer, recover="lstsq",
                                                                hidden=opt_in, **data))
                report = result.report
                before_ms, after_ms = latency(str(path), result.model)
                kept = report["after"]["macs"] / report["before"]["macs"]
                setting = f"{scorer} {fraction:.0%}{' --hidden' if opt_in else ''}"
                sentence_cosine, spearman = _sentences.agreement(original, embeddings(result.model, evaluation))
                yield (f"{name:<12}{setting:>20}{kept:>10.1%}{counts(report['groups'], 'channels_after')}"
                       f"{report['fidelity']['per_output'][EMBEDDING]['cosine']:>9.4f}{sentence_cosine:>9.4f}"
                       f"{spearman:>9.4f}{before_ms:>9.1f}{after_ms:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--macs", default="0.7,0.5")
    parser.add_argument("--scorers", default="obs,wanda")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--hidden", default="off,on", help="without (off) and/or with (on) --hidden")
    parser.add_argument("--graphs", default="plain,fused")
    parser.add_argument("--text", choices=("real", "random"), default=None,
                        help="real sentences (the default when they can be had) or random token ids")
    parser.add_argument("--model", type=Path, help="evaluate this encoder instead of MiniLM-L3")
    parser.add_argument("--name", default="", help="a label for --model's rows (plain and fused are suffixed)")
    args = parser.parse_args()
    macs = [float(m) for m in args.macs.split(",")]
    if args.model:
        global EMBEDDING
        plain = args.model
        EMBEDDING = onnx.load(str(plain), load_external_data=False).graph.output[0].name
    else:
        assert input_shapes("minilm")["input_ids"][0] == 1
        plain = fetch("minilm")
    calibration, evaluation, what = inputs(args.text, args.calib_samples, args.eval_samples)
    print(f"inputs: {what}; {len(calibration['input_ids'])} calibrate, {len(evaluation['input_ids'])} others evaluate")
    hidden = [{"off": False, "on": True}[h] for h in args.hidden.split(",")]
    print(f"{'graph':<12}{'setting':>20}{'coverage':>10}{'heads':>7}{'FFN':>7}{'hidden':>7}{'cosine':>9}{'sentence':>9}"
          f"{'Spearman':>9}{'ms/128':>9}{'pruned':>9}")
    print(f"{'':<12}{'':>20}{'/ MACs':>10}{'':>7}{'':>7}{'':>7}{'(embed.)':>9}{'cosine':>9}{'(pairs)':>9}{'before':>9}"
          f"{'ms/128':>9}")
    with tempfile.TemporaryDirectory() as work:
        fused_path, why_not = fused(plain, Path(work))
        for name, path in (("plain", plain), ("fused", fused_path)):
            if name not in args.graphs.split(","):
                continue
            if path is None:
                print(f"{name:<12}skipped: {why_not}")
                continue
            label = f"{args.name} {name}".strip()
            for line in rows(label, path, macs, args.scorers.split(","), hidden, calibration, evaluation):
                print(line, flush=True)


if __name__ == "__main__":
    main()
