"""Attention heads and FFN neurons of the public MiniLM-L3 sentence encoder (3 layers, 12 heads of 32,
FFN 1536), as exported (plain) and as fused by `onnxruntime.transformers.optimizer` (Attention,
SkipLayerNormalization, BiasGelu; the fusion needs sympy: without it that row says so and is skipped).

Per graph: coverage and the prunable heads and FFN neurons (`onnxprune inspect`, also with `--hidden`);
then for each scorer (obs, which allocates by error per MAC; wanda, at one ratio for every group) at each
fraction of MACs kept (--target-macs, calibration inputs, lstsq recovery), without and with `--hidden`
(the residual width pruned too): the heads, FFN neurons and hidden size kept, the cosine of the sentence
embedding (the mean-pooled output; with --hidden its removed dimensions are zeros) on held-out inputs,
the Spearman agreement of the held-out inputs' pairwise embedding similarities (the original's against
the pruned model's, all pairs), and onnxruntime latency at sequence length 128 (1 thread, median of 30
runs, original and pruned timed in alternation).

Inputs: random token ids framed by [CLS] and [SEP], 16 long (no tokenizer ships with the model, so no
real sentences): 64 calibrate, 32 others evaluate.

    python bench/eval_heads.py [--macs 0.7,0.5] [--scorers obs,wanda] [--hidden off,on] [--graphs plain,fused]
                               [--calib-samples 64] [--eval-samples 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxprune  # noqa: E402
from onnxprune import PruneConfig  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from onnxprune.validate.latency import LatencyConfig, summarize, time_runs  # noqa: E402
from tests.real_models import fetch, input_shapes  # noqa: E402

LENGTH, LATENCY_LENGTH = 16, 128
EMBEDDING = "461"  # the mean-pooled sentence embedding [batch, 384]


def tokens(count: int, length: int, seed: int) -> dict:
    ids = np.random.default_rng(seed).integers(1000, 20000, size=(count, length))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def fused(path: Path, work: Path) -> tuple[Path | None, str]:
    """The graph fused by onnxruntime's transformer optimizer, or None and why not."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    except ImportError as error:
        return None, f"the fusion needs {error.name or error} (pip install sympy)"
    out = work / "minilm_fused.onnx"
    optimized.save_model_to_file(str(out))
    return out, ""


def units(groups: list[dict], kind: str, key: str) -> int:
    """Heads (attention groups), the hidden size (the group of the embedding) or FFN neurons (the other
    prunable groups), before or after."""
    def kind_of(group):
        name = group["name"].lower()
        return "heads" if "attention" in name else "hidden" if "embed" in name else "ffn"
    return sum(g.get(key, g["channels"]) for g in groups if g["prunable"] and kind_of(g) == kind)


def similarity_spearman(original, pruned, feed: dict) -> float:
    """Spearman correlation of the pairwise cosine similarities of the inputs' sentence embeddings."""
    def pair_similarities(model):
        run = session(model).run
        embedding = np.concatenate([run([EMBEDDING], {k: v[i:i + 1] for k, v in feed.items()})[0]
                                    for i in range(len(feed["input_ids"]))])
        unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
        return (unit @ unit.T)[np.triu_indices(len(unit), 1)]

    ranks = [np.argsort(np.argsort(pair_similarities(m))) for m in (original, pruned)]
    return float(np.corrcoef(*ranks)[0, 1])


def latency(original, pruned) -> tuple[float, float]:
    feed = tokens(1, LATENCY_LENGTH, seed=3)
    times = time_runs({"before": session(original, threads=1), "after": session(pruned, threads=1)}, feed,
                      LatencyConfig(threads=1))
    return summarize(times["before"])["median_ms"], summarize(times["after"])["median_ms"]


def counts(groups: list[dict], key: str) -> str:
    return "".join(f"{units(groups, kind, key):>7}" for kind in ("heads", "ffn", "hidden"))


def rows(name: str, path: Path, macs: list[float], scorers: list[str], hidden: list[bool], calib_samples: int,
         eval_samples: int):
    shapes = {"input_ids": [1, LENGTH], "attention_mask": [1, LENGTH]}
    for opt_in in hidden:
        info = onnxprune.inspect(str(path), shapes, hidden=opt_in)
        setting = "inspect --hidden" if opt_in else "inspect"
        yield f"{name:<8}{setting:>20}{info['coverage']:>10.1%}{counts(info['groups'], 'channels')}"
    data = dict(calibration=tokens(calib_samples, LENGTH, seed=0), evaluation=tokens(eval_samples, LENGTH, seed=1),
                input_shapes=shapes)
    held_out = tokens(eval_samples, LENGTH, seed=1)
    for scorer in scorers:
        for fraction in macs:
            for opt_in in hidden:
                result = onnxprune.prune(str(path), PruneConfig(target_macs=fraction, scorer=scorer, recover="lstsq",
                                                                hidden=opt_in, **data))
                report = result.report
                before_ms, after_ms = latency(str(path), result.model)
                kept = report["after"]["macs"] / report["before"]["macs"]
                setting = f"{scorer} {fraction:.0%}{' --hidden' if opt_in else ''}"
                spearman = similarity_spearman(str(path), result.model, held_out)
                yield (f"{name:<8}{setting:>20}{kept:>10.1%}{counts(report['groups'], 'channels_after')}"
                       f"{report['fidelity']['per_output'][EMBEDDING]['cosine']:>9.4f}{spearman:>9.4f}"
                       f"{before_ms:>9.1f}{after_ms:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--macs", default="0.7,0.5")
    parser.add_argument("--scorers", default="obs,wanda")
    parser.add_argument("--hidden", default="off,on", help="without (off) and/or with (on) --hidden")
    parser.add_argument("--graphs", default="plain,fused")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    args = parser.parse_args()
    macs = [float(m) for m in args.macs.split(",")]
    assert input_shapes("minilm")["input_ids"][0] == 1
    plain = fetch("minilm")
    hidden = [{"off": False, "on": True}[h] for h in args.hidden.split(",")]
    print(f"{'graph':<8}{'setting':>20}{'coverage':>10}{'heads':>7}{'FFN':>7}{'hidden':>7}{'cosine':>9}{'Spearman':>9}"
          f"{'ms/128':>9}{'pruned':>9}")
    print(f"{'':<8}{'':>20}{'/ MACs':>10}{'':>7}{'':>7}{'':>7}{'(embed.)':>9}{'(sim.)':>9}{'before':>9}{'ms/128':>9}")
    with tempfile.TemporaryDirectory() as work:
        fused_path, why_not = fused(plain, Path(work))
        for name, path in (("plain", plain), ("fused", fused_path)):
            if name not in args.graphs.split(","):
                continue
            if path is None:
                print(f"{name:<8}skipped: {why_not}")
                continue
            for line in rows(name, path, macs, args.scorers.split(","), hidden, args.calib_samples, args.eval_samples):
                print(line, flush=True)


if __name__ == "__main__":
    main()
