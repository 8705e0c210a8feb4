"""Quality gates: limits a CI job sets on a pruning result, checked against the report's measurements.

A gate never changes the result; `evaluate_gates` only reads the report and says, per gate, the measured
value, the limit and whether it passed. The CLI turns a failed gate into exit code 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UsageError
from .compare import worst_channel


@dataclass(frozen=True)
class Gates:
    min_cosine: float | None = None  # lowest cosine over the outputs
    min_top1_agreement: float | None = None  # lowest top-1 agreement over classifier-shaped outputs
    max_accuracy_drop: float | None = None  # accuracy before minus after, as a fraction (needs labels)
    min_speedup: float | None = None  # measured latency before / after
    max_macs: float | None = None  # MACs after / MACs before
    max_channel_error: float | None = None  # highest relative L2 error of one channel of any output

    @property
    def needs_labels(self) -> bool:
        return self.max_accuracy_drop is not None

    @property
    def needs_latency(self) -> bool:
        return self.min_speedup is not None

    def given(self) -> dict[str, float]:
        return {name: limit for name, limit in asdict(self).items() if limit is not None}


OPTIONS = {
    "min_cosine": "--min-cosine",
    "min_top1_agreement": "--min-top1-agreement",
    "max_accuracy_drop": "--max-accuracy-drop",
    "min_speedup": "--min-speedup",
    "max_macs": "--max-macs",
    "max_channel_error": "--max-channel-error",
    "ort_conversion": "--mobile",
}


def evaluate_gates(report: dict, gates: Gates | None) -> dict:
    """{"passed": bool, "checks": [...]}: one check per gate given (and the .ort conversion with --mobile)."""
    checks = []
    for name, limit in (gates.given() if gates else {}).items():
        value, what = MEASURES[name](report)
        passed = value <= limit if name.startswith("max_") else value >= limit
        checks.append(_check(name, limit, value, what, passed))
    if "mobile" in report:
        converted = report["mobile"]["ort"]["converted"]
        checks.append(_check("ort_conversion", True, converted, "conversion to the ORT format", converted))
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _check(name, limit, value, what, passed) -> dict:
    return {"gate": name, "option": OPTIONS[name], "limit": limit, "value": value, "what": what, "passed": bool(passed)}


def failed_checks(report: dict) -> list[dict]:
    return [c for c in report.get("gates", {}).get("checks", []) if not c["passed"]]


def describe(check: dict) -> str:
    """One line: which gate, measured value and limit."""
    if check["gate"] == "ort_conversion":
        return f"{check['option']}: {check['what']} {'succeeded' if check['passed'] else 'failed'}"
    relation = ">=" if check["gate"].startswith("min_") else "<="
    return (f"{check['option']} {check['limit']:g}: {check['what']} is {check['value']:.4f} "
            f"(required {relation} {check['limit']:g})")


def _cosine(report):
    per_output = report["fidelity"]["per_output"]
    name = min(per_output, key=lambda n: per_output[n]["cosine"])
    return per_output[name]["cosine"], f"cosine of output '{name}'"


def _top1(report):
    per_output = {n: f for n, f in report["fidelity"]["per_output"].items() if f.get("top1_agreement") is not None}
    if not per_output:
        raise UsageError("--min-top1-agreement needs an output shaped [batch, classes] and this model has none: "
                         "use --min-cosine instead")
    name = min(per_output, key=lambda n: per_output[n]["top1_agreement"])
    return per_output[name]["top1_agreement"], f"top-1 agreement of output '{name}'"


def _accuracy_drop(report):
    accuracy = report.get("accuracy")
    if accuracy is None:
        raise UsageError("--max-accuracy-drop needs labels: give --labels FILE or data with a 'labels' array")
    return accuracy["drop"], f"accuracy drop ({accuracy['before']:.4f} -> {accuracy['after']:.4f})"


def _speedup(report):
    latency = report.get("latency")
    if latency is None or latency.get("speedup") is None:
        raise UsageError("--min-speedup needs a latency measurement: it could not be made")
    return latency["speedup"], (f"measured speedup ({latency['before']['median_ms']:.3f} ms -> "
                                f"{latency['after']['median_ms']:.3f} ms)")


def _macs(report):
    before, after = report["before"]["macs"], report["after"]["macs"]
    return (after / before if before else 1.0), f"MACs kept ({after:,} of {before:,})"


NO_CHANNEL_AXIS = ("--max-channel-error needs a floating-point output with a channel axis and this model has "
                   "none of rank 2 or more: name the axis with --output-axis NAME:AXIS, or use --min-cosine")


def _channel_error(report):
    worst = worst_channel(report["fidelity"])
    if worst is None:
        raise UsageError(NO_CHANNEL_AXIS)
    name, channel, _ = worst
    return channel["rel_l2"], f"relative L2 error of channel {channel['index']} of output '{name}' (the worst)"


MEASURES = {
    "min_cosine": _cosine,
    "min_top1_agreement": _top1,
    "max_accuracy_drop": _accuracy_drop,
    "min_speedup": _speedup,
    "max_macs": _macs,
    "max_channel_error": _channel_error,
}


def check_channel_gate(gates: Gates | None, outputs: dict[str, tuple[tuple | None, bool]], axes: dict[str, int]) -> None:
    """Refuse before any work --max-channel-error when no output can have a channel axis. `outputs`: each
    output's (inferred shape or None, whether it may be floating-point); `axes`: the --output-axis ones.
    An output of unknown shape may have one: the gate then decides after the run."""
    if gates is None or gates.max_channel_error is None:
        return
    if not any(floating and (shape is None or len(shape) >= 2 or name in axes)
               for name, (shape, floating) in outputs.items()):
        raise UsageError(NO_CHANNEL_AXIS)


def check_gate_requirements(gates: Gates | None, has_labels: bool) -> None:
    """Refuse before any work a gate that the data cannot measure."""
    if gates and gates.needs_labels and not has_labels:
        raise UsageError("--max-accuracy-drop needs labels: give --labels FILE or an .npz with a 'labels' array")
