"""The fuzz tier's default share: 100 seeded broken or hostile inputs through the command line, each ending
in exit 0 with a valid model or a one-line error (exit 2 or 3; 1 for a gate), never a traceback, a signal,
a hang, an invalid model, a changed input or a file left behind (tests/fuzz.py; bench/fuzz.py runs more)."""

import pytest

from tests.fuzz import FAILURES, make_case, run_case

CASES = 100


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_case(tmp_path, seed):
    case = make_case(seed, tmp_path)
    outcome = run_case(case, tmp_path)
    assert outcome.result not in FAILURES, f"{outcome.kind} ({outcome.note}) {case.args[2:]}: " \
                                           f"{outcome.result}: {outcome.message}"
