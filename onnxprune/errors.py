"""Errors a user can act on, and their exit codes (table in docs/architecture.md, "Conventions").

Every `OnnxPruneError` carries a one-line message saying what was wrong and what to do.
`InternalError` is deliberately *not* a subclass: it is a bug in onnxprune, not bad input.
"""


class OnnxPruneError(Exception):
    """Base of user-facing errors. The CLI prints the message on one line."""

    exit_code = 3


class UsageError(OnnxPruneError):
    """Bad arguments: a ratio out of range, OUT == IN, an unwritable path, a missing shape."""

    exit_code = 2


class ModelError(OnnxPruneError):
    """The model cannot be read or is not supported."""

    exit_code = 3


class DataError(OnnxPruneError):
    """The calibration data does not fit the model or cannot be read."""

    exit_code = 3


class NothingToPrune(ModelError):
    """Analysis found no group of channels that can be pruned."""


class ValidationFailed(OnnxPruneError):
    """A validation threshold was not met (exit code 1)."""

    exit_code = 1


class InternalError(Exception):
    """A bug in onnxprune: the rewrite produced an invalid model, an invariant broke."""

    exit_code = 4


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
