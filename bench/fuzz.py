"""The fuzz tier at scale: `python bench/fuzz.py --n 2000` makes and runs that many seeded cases
(tests/fuzz.py; the default suite runs the first 100) and prints the tally, mutation kind x outcome,
then every failure (a traceback, a signal, a hang, exit 4, an invalid model, a changed input, a file
left behind) with its seed, to reproduce with `--seed S --n 1`. `--heavy` adds the onnx light
topologies (SqueezeNet, AlexNet) to the models mutated."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import FAILURES, make_case, run_case, tally  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="cases to run")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--heavy", action="store_true", help="also mutate the onnx light topologies")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting cases after this long")
    args = parser.parse_args()
    outcomes, started = [], time.perf_counter()
    for seed in range(args.seed, args.seed + args.n):
        if args.minutes is not None and time.perf_counter() - started > 60 * args.minutes:
            print(f"stopped after {len(outcomes)} cases ({args.minutes} min)")
            break
        with tempfile.TemporaryDirectory(prefix="onnxprune-fuzz-") as tmp:
            outcome = run_case(make_case(seed, Path(tmp), heavy=args.heavy), Path(tmp))
        outcome.seed = seed
        outcomes.append(outcome)
        if len(outcomes) % 100 == 0:
            print(f"{len(outcomes)} cases, {time.perf_counter() - started:.0f} s", flush=True)
        if outcome.result in FAILURES:
            print(f"seed {seed}: {outcome.kind} ({outcome.note}): {outcome.result}: {outcome.message}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"\n{len(outcomes)} cases in {elapsed:.0f} s ({elapsed / max(len(outcomes), 1):.2f} s each)\n")
    print(tally(outcomes))
    slowest = max(outcomes, key=lambda o: o.seconds)
    print(f"\nslowest case: seed {slowest.seed} ({slowest.kind}) {slowest.seconds:.1f} s")
    return 1 if any(o.result in FAILURES for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
