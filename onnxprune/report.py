"""Reports: the JSON written with --report, and the short tables printed on the terminal."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, data) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".onnxprune-", suffix=".json", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def _row(label: str, before: int, after: int, unit: str = "") -> str:
    return f"  {label:<10}{before:>16,}{unit} -> {after:>14,}{unit}  ({_change(before, after)})"


def format_summary(report: dict, model, output) -> str:
    before, after, fid = report["before"], report["after"], report["fidelity"]
    groups = report["groups"]
    prunable = [g for g in groups if g["prunable"]]
    changed = sum(1 for g in prunable if g.get("channels_after", g["channels"]) < g["channels"])
    data = report["data"]
    lines = [
        f"onnxprune {report['version']}: {model} -> {output}",
        f"  groups    {len(prunable)} prunable of {len(groups)} (coverage {report['coverage']:.1%}), {changed} pruned",
        _row("params", before["params"], after["params"]),
        _row("MACs", before["macs"], after["macs"]),
        _row("size", before["size_bytes"], after["size_bytes"], " B"),
        f"  fidelity  cosine {fid['cosine']:.4f}  rel. L2 error {fid['rel_l2']:.4f}  max |diff| {fid['max_abs_diff']:.4g}"
        + (f"  top-1 agreement {fid['top1_agreement']:.1%}" if fid.get("top1_agreement") is not None else ""),
        f"            measured on {data['samples']} {data['source']} samples"
        + (" (no --calib given: synthetic inputs say little about accuracy)" if data["source"] == "synthetic" else ""),
    ]
    if len(fid.get("per_output", {})) > 1:
        for name, f in fid["per_output"].items():
            lines.append(f"            output {name}: cosine {f['cosine']:.4f}, rel. L2 error {f['rel_l2']:.4f}")
    for note in report.get("scoring_notes", []):
        lines.append(f"  note      {note}")
    return "\n".join(lines)


def format_inspect(info: dict, model) -> str:
    groups = info["groups"]
    prunable = [g for g in groups if g["prunable"]]
    lines = [
        f"{model}: {len(groups)} channel groups, {len(prunable)} prunable, coverage {info['coverage']:.1%}",
        f"params {info['params']:,}  MACs {info['macs']:,}  size {info['size_bytes']:,} B  "
        f"(at input shapes {info['input_shapes']})",
        "",
        f"{'group':<32}{'channels':>9}  {'members':>7}  status",
    ]
    for g in groups:
        status = "prunable" if g["prunable"] else "blocked: " + "; ".join(g["reasons"])
        lines.append(f"{g['name'][:31]:<32}{g['channels']:>9}  {len(g['members']):>7}  {status}")
    return "\n".join(lines)
