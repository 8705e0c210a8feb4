"""Reports: the JSON written with --report, and the short tables printed on the terminal."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

from .validate.compare import worst_channel
from .version import __version__
from .workdir import staging_path

# The JSON report's layout version (docs/report-schema.md). Adding a key keeps it; renaming, removing or
# changing the meaning of one bumps it, so CI scripts that read reports can check what they get.
SCHEMA_VERSION = 2

# The terminal names an output's worst channel when its error is above FAR_WORSE_ERROR and more than
# FAR_WORSE_RATIO times the whole output's: a few destroyed channels (class scores beside box coordinates
# many times larger) hardly move the whole output's figures.
FAR_WORSE_ERROR = 0.2
FAR_WORSE_RATIO = 3.0

SYNTHETIC_ONLY = "only: the model was not checked on real inputs and may be broken on them"
HOW_TO_GIVE_DATA = ("give real samples: --calib DIR --preprocess imagenet (a folder of images), --calib FILE.npz "
                    "(arrays named after the inputs) or --data-loader-script FILE.py:FUNC")


def title(text: str) -> str:
    """The first line of everything onnxprune prints about a run."""
    return f"onnxprune {__version__}: {text}"


def report_header() -> dict:
    """The keys every JSON report and sweep table starts with: which onnxprune and which layout wrote it."""
    return {"version": __version__, "schema_version": SCHEMA_VERSION}


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = staging_path(path.resolve().parent, path.suffix)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def _row(label: str, before: int, after: int, unit: str = "") -> str:
    return f"  {label:<10}{before:>16,}{unit} -> {after:>14,}{unit}  ({_change(before, after)})"


def latency_model_line(latency: dict) -> str:
    """The latency model's prediction beside the measurement, and a latency target's rounds."""
    line = (f"  predicted {latency['model_original_ms']:>13.3f} ms -> {latency['predicted_ms']:>11.3f} ms"
            f"  (speedup {latency['predicted_speedup']:.2f}x, error {100 * latency['prediction_error']:+.1f}% of the "
            f"measured; MACs kept {100 * latency['macs_kept']:.1f}%; {latency['model']['layers']} layers timed"
            f"{', from the cache' if latency['model']['cached'] else ''})")
    if latency.get("round_to_by") == "block":
        chosen = ", ".join(f"{m} for {n} group(s)" for m, n in latency["round_to"].items())
        line += (f"\n  round-to  {chosen} of Convs (onnxruntime's channel block on this machine); "
                 "--round-to N to choose")
    elif "round_to" in latency:
        chosen = ", ".join(f"{n} at {m}" for m, n in latency["round_to"].items())
        line += f"\n  round-to  auto: groups rounded to the measured multiple: {chosen}"
    if "rounds" in latency:
        rounds = ", ".join(f"{r['measured_ms']:.3f}" for r in latency["rounds"])
        line += (f"\n  target    {latency['asked']}: {latency['target_ms']:.3f} ms "
                 f"{'met' if latency['met'] else 'missed'}; measured per round {rounds} ms")
        if latency["met"] and latency.get("met_in_final_timing") is False:
            line += ("\n            missed in the final timing above (by more than 5%): the machine's timings vary; "
                     "time the result again on a quiet machine")
    return line


def format_simplified(report: dict) -> list[str]:
    counts = report.get("simplified")
    if not counts:
        return []
    done = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())
    return [f"  simplified {done} (exact rewrites at loading; --no-simplify keeps the ops)"]


def format_summary(report: dict, model, output) -> str:
    before, after, fid = report["before"], report["after"], report["fidelity"]
    groups = report["groups"]
    prunable = [g for g in groups if g["prunable"]]
    changed = sum(1 for g in prunable if g.get("channels_after", g["channels"]) < g["channels"])
    inexact = sum(1 for g in prunable if g.get("inexact") and g.get("channels_after", g["channels"]) < g["channels"])
    data = report["data"]
    lines = [
        title(f"{model} -> {output}"),
        f"  groups    {len(prunable)} prunable of {len(groups)} (coverage {report['coverage']:.1%}), {changed} pruned"
        + (f", {inexact} inexactly (--hidden: a LayerNorm's statistics change; the fidelity below measures it)"
           if inexact else ""),
        *format_simplified(report),
        *format_scoring(report),
        *format_lowrank(report),
        *format_sparsity(report),
        *format_quantize(report),
        _row("params", before["params"], after["params"]),
        _row("MACs", before["macs"], after["macs"]),
        _row("size", before["size_bytes"], after["size_bytes"], " B"),
        f"  fidelity  cosine {fid['cosine']:.4f}  rel. L2 error {fid['rel_l2']:.4f}  max |diff| {fid['max_abs_diff']:.4g}"
        + (f"  top-1 agreement {fid['top1_agreement']:.1%}" if fid.get("top1_agreement") is not None else ""),
        f"            measured on {measured_on(data)}",
    ]
    if len(fid.get("per_output", {})) > 1:
        for name, f in fid["per_output"].items():
            lines.append(f"            output {name}: cosine {f['cosine']:.4f}, rel. L2 error {f['rel_l2']:.4f}")
    if fid.get("reference_constant"):
        lines.append("            the original's outputs are (nearly) the same for every sample: these figures cannot tell "
                     "a good cut from a bad one (untrained or zeroed final layers, or inputs that do not vary?)")
    lines.extend(f"            {line}" for line in far_worse_channel(fid))
    lines.extend(format_recovery(report))
    lines.extend(format_checks(report))
    for note in report.get("scoring_notes", []):
        lines.append(f"  note      {note}")
    if data["source"] == "synthetic":
        lines.append(f"  data      {HOW_TO_GIVE_DATA}")
    return "\n".join(lines)


def measured_on(data: dict) -> str:
    """What the fidelity figures were measured on, in words (the report's `data` section)."""
    text = f"{data['samples']} {'held-out ' if data.get('held_out') else ''}{data['source']} samples"
    if data.get("held_out"):
        return text + ", left out of every fit (every fifth; the in-sample figures are in the report)"
    if data.get("in_sample"):
        return text + " the fits used: in-sample figures flatter the result (give --eval with other samples)"
    if data["source"] == "synthetic":
        return f"{text} {SYNTHETIC_ONLY}"
    return text


def far_worse_channel(fid: dict) -> list[str]:
    """A line naming the worst channel of any output when it is far worse than its whole output."""
    worst = worst_channel(fid)
    if worst is None:
        return []
    name, channel, output = worst
    if not (channel["rel_l2"] > FAR_WORSE_ERROR and channel["rel_l2"] > FAR_WORSE_RATIO * output["rel_l2"]):
        return []
    return [f"worst channel: {name}[{channel['index']}] rel. error {channel['rel_l2']:.2f} "
            f"(the whole output: {output['rel_l2']:.2f})"]


def format_scoring(report: dict) -> list[str]:
    """The scorer that ran, on which data, and the budget it met."""
    scoring = report.get("scoring")
    if not scoring:
        return []
    line = f"  scoring   {scoring['scorer']}"
    if scoring.get("pfp_mode"):
        line += f" ({scoring['pfp_mode']}, {scoring.get('points_per_layer')} points per layer)"
    line += f" on {scoring['samples']} {scoring['data']} samples"
    budget = scoring.get("budget")
    if budget:
        if budget["unit"] == "ms":
            line += f"; {budget['achieved']:.3f} ms predicted of a budget of {budget['target']:.3f}"
        else:
            unit = "MACs" if budget["unit"] == "macs" else "channels kept"
            line += f"; {budget['achieved']:,.0f} {unit} of a budget of {budget['target']:,.0f}"
        if "eps" in budget:
            line += f" (eps {budget['eps']:.3g})"
        if budget.get("reached") is False:
            line += ", not reached (see the note)"
    return [line]


def format_quantize(report: dict) -> list[str]:
    """Terminal lines of the int8 hand-off: the pruned-only figures beside the quantized output's."""
    quantize = report.get("quantize")
    if not quantize:
        return []
    alone, fid = quantize["pruned_only"], report["fidelity"]
    accuracy = report.get("accuracy") or {}

    def figures(size, cosine, acc, latency):
        return (f"size {size:,} B, cosine {cosine:.4f}" + (f", accuracy {acc:.2%}" if acc is not None else "")
                + (f", latency {latency:.3f} ms" if latency is not None else ""))

    latency = report.get("latency", {}).get("after", {}).get("median_ms")
    return [f"  int8      {quantize['format']} by onnxruntime (weights {quantize['weights']}, activations "
            f"{quantize['activations']}, {quantize['samples']} calibration samples); the rows below are the quantized output's",
            f"            pruned only: {figures(alone['size_bytes'], alone['fidelity']['cosine'], alone.get('accuracy'), alone.get('latency_ms'))}",
            f"            quantized:   {figures(report['after']['size_bytes'], fid['cosine'], accuracy.get('after'), latency)}",
            *_worst_layers(quantize)]


def _worst_layers(quantize: dict) -> list[str]:
    worst, excluded = quantize.get("worst_layers"), quantize.get("excluded_nodes")
    lines = [f"            left float:  {', '.join(excluded)}"] if excluded else []
    if isinstance(worst, list) and worst:
        lines.append("            most lost:   " + ", ".join(f"{w['node'] or w['tensor']} ({w['sqnr_db']:.1f} dB)" for w in worst[:3])
                     + " (SQNR against float; leave one float with --quantize-exclude NODE)")
    return lines


def format_sparsity(report: dict) -> list[str]:
    """Terminal lines of the sparsity stage: weights zeroed, in how many layers, worst layer error."""
    sparsity = report.get("sparsity")
    if not sparsity:
        return []
    line = (f"  sparsity  {sparsity['zeros']:,} of {sparsity['weights']:,} weights zeroed ({sparsity['achieved']:.1%}, "
            f"{sparsity['pattern']}, {sparsity['method']}) in {sparsity['sparsified']} layers, worst layer error "
            f"{sparsity['worst_error']:.3f}")
    lines = [line]
    storage = sparsity.get("storage", {})
    if "stored_bytes" in storage:
        lines.append(f"            stored {storage['stored_bytes']:,} B ({storage['sparse_tensors']} tensors sparse, {storage['index']} indices; "
                     f"dense {storage['dense_bytes']:,} B), gzip {storage['gzip_bytes']:,} B "
                     f"(dense gzip {storage['dense_gzip_bytes']:,} B)")
    if sparsity["skipped"]:
        skipped = [layer for layer in sparsity["layers"] if layer["status"] == "skipped"]
        lines.append(f"            {len(skipped)} layers left dense, e.g. {skipped[0]['node']}: {skipped[0]['reason']}")
    return lines


def format_lowrank(report: dict) -> list[str]:
    """Terminal lines of the low-rank stage: layers factorized, worst error, skipped layers by reason."""
    lowrank = report.get("lowrank")
    if not lowrank:
        return []
    layers = lowrank["layers"]
    done = [layer for layer in layers if layer["status"] == "factorized"]
    line = f"  low-rank  {len(done)} of {len(layers)} layers factorized"
    if done:
        kept = sum(layer["macs_after"] for layer in done) / max(sum(layer["macs_before"] for layer in done), 1)
        line += (f" to {kept:.0%} of their MACs, worst layer error {lowrank['worst_error']:.3f}"
                 f" ({'calibration-weighted' if lowrank['data_aware'] else 'weights only'})")
    lines = [line]
    reasons: dict[str, int] = {}
    for layer in layers:
        if layer["status"] == "skipped":
            key = re.sub(r"\d+(\.\d+)?", "N", layer["reason"].split(" (")[0])
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])
        lines.append("            skipped: " + "; ".join(f"{n}x {r}" for r, n in top[:3])
                     + ("; ..." if len(top) > 3 else ""))
    if lowrank.get("mode") == "budget" and not lowrank.get("reached"):
        lines.append(f"  note      --target-macs {lowrank['target_macs']} is out of reach of factorization at any rank: "
                     "add --filters or raise the target")
    return lines


def format_recovery(report: dict) -> list[str]:
    """Terminal lines of the recovery stage (layers re-fitted, mean layer error) and of fine-tuning."""
    lines = []
    recovery = report.get("recovery")
    if recovery and recovery["method"] != "none":
        line = f"  recovery  {recovery['method']}: {recovery['recovered']} layer(s) re-fitted"
        if recovery["mean_error_before"] is not None:
            line += (f", mean layer output error {recovery['mean_error_before']:.3f} -> {recovery['mean_error_after']:.3f}"
                     f" on {recovery['samples']} {recovery['source']} samples")
        if recovery["skipped"]:
            line += f"; {recovery['skipped']} skipped (see the report)"
        lines.append(line)
        if recovery.get("note"):
            lines.append(f"  note      {recovery['note']}")
    finetune = report.get("finetune")
    if finetune:
        lines.append(f"  finetune  {finetune['steps']} {finetune['loss']} distillation steps (lr {finetune['lr']:g}): "
                     f"loss {finetune['loss_before']:.4g} -> {finetune['loss_after']:.4g} on the calibration data")
        if finetune.get("kept"):
            lines.append(f"  kept      {finetune['kept']}")
    return lines


def format_finetune_summary(report: dict, model, output) -> str:
    """What `onnxprune finetune` prints: fine-tuning, cost and fidelity against the teacher, checks."""
    before, after, fid, data = report["before"], report["after"], report["fidelity"], report["data"]
    lines = [title(f"{model} -> {output} (fine-tuned towards the teacher)"),
             *format_recovery(report),
             _row("params", before["params"], after["params"]) + "  (teacher -> result)",
             _row("MACs", before["macs"], after["macs"]),
             f"  fidelity  cosine {fid['cosine']:.4f}  rel. L2 error {fid['rel_l2']:.4f}  max |diff| {fid['max_abs_diff']:.4g}"
             + (f"  top-1 agreement {fid['top1_agreement']:.1%}" if fid.get("top1_agreement") is not None else ""),
             f"            against the teacher on {measured_on(data)}"]
    lines.extend(format_checks(report))
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
        status = "blocked: " + "; ".join(g["reasons"]) if not g["prunable"] else (
            f"prunable, inexact: {g['inexact'][0]}" + (f" (and {len(g['inexact']) - 1} more)" if len(g["inexact"]) > 1 else "")
            if g.get("inexact") else "prunable")
        lines.append(f"{g['name'][:31]:<32}{g['channels']:>9}  {len(g['members']):>7}  {status}")
    return "\n".join(lines)


def format_checks(report: dict) -> list[str]:
    """Terminal lines for accuracy, latency, the mobile check and the gates (only what was measured)."""
    from .validate.gates import describe, failed_checks

    lines = []
    accuracy = report.get("accuracy")
    if accuracy:
        lines.append(f"  accuracy  {accuracy['before']:.2%} -> {accuracy['after']:.2%}  (drop {100 * accuracy['drop']:.2f}"
                     f" points on {accuracy['samples']} labelled {report['data']['source']} samples)")
        distortion = accuracy["distortion"]
        if distortion["intensification"] is not None:
            lost = ", ".join(str(k) for k in distortion["most_lost"]) or "none"
            lines.append(f"            recall distortion: intensification {distortion['intensification']:+.3f} "
                         f"(> 0: classes below accuracy lost relatively more); most recall lost: class {lost}")
    latency = report.get("latency")
    if latency:
        lines.append(f"  latency   {latency['before']['median_ms']:>13.3f} ms -> {latency['after']['median_ms']:>11.3f} ms"
                     f"  (speedup {latency['speedup']:.2f}x; median of {latency['runs']}, {latency['threads']} thread(s))")
        if "predicted_ms" in latency:
            lines.append(latency_model_line(latency))
    mobile = report.get("mobile")
    if mobile:
        lines.append(f"  mobile    {mobile['verdict']}")
    checks = report.get("gates", {}).get("checks", [])
    failed = failed_checks(report)
    if checks:
        lines.append(f"  gates     {'PASSED' if not failed else 'FAILED'}: {len(checks) - len(failed)} of {len(checks)} passed")
    for check in failed:
        lines.append(f"  FAILED    {describe(check)}")
    if report.get("output_written") is False:
        lines.append("  output    NOT WRITTEN because a gate failed (--keep-failed writes it anyway)")
    return lines


def _md_row(label: str, before, after, change: str = "") -> str:
    return f"| {label} | {before} | {after} | {change} |"


def format_markdown(report: dict, model, output) -> str:
    """A Markdown summary for a CI job page (e.g. appended to $GITHUB_STEP_SUMMARY)."""
    from .validate.gates import describe

    before, after, fid = report["before"], report["after"], report["fidelity"]
    gates = report.get("gates", {"passed": True, "checks": []})
    status = "passed" if gates["passed"] else "FAILED"
    lines = [f"## onnxprune: `{model}` -> `{output}` ({status})", "",
             "| | before | after | change |", "| --- | ---: | ---: | ---: |",
             _md_row("params", f"{before['params']:,}", f"{after['params']:,}", _change(before["params"], after["params"])),
             _md_row("MACs", f"{before['macs']:,}", f"{after['macs']:,}", _change(before["macs"], after["macs"])),
             _md_row("file size (B)", f"{before['size_bytes']:,}", f"{after['size_bytes']:,}",
                     _change(before["size_bytes"], after["size_bytes"]))]
    latency = report.get("latency")
    if latency:
        lines.append(_md_row("latency (ms, median)", f"{latency['before']['median_ms']:.3f}",
                             f"{latency['after']['median_ms']:.3f}", f"{latency['speedup']:.2f}x speedup"))
    accuracy = report.get("accuracy")
    if accuracy:
        lines.append(_md_row("accuracy", f"{accuracy['before']:.2%}", f"{accuracy['after']:.2%}",
                             f"{-100 * accuracy['drop']:+.2f} points"))
    data = report["data"]
    lines += ["", f"Fidelity on {measured_on(data)}: cosine {fid['cosine']:.4f}, "
              f"relative L2 error {fid['rel_l2']:.4f}"
              + (f", top-1 agreement {fid['top1_agreement']:.2%}" if fid.get("top1_agreement") is not None else "") + "."]
    lines += [f"{line[0].upper()}{line[1:]}." for line in far_worse_channel(fid)]
    if data["source"] == "synthetic":
        lines += [f"{HOW_TO_GIVE_DATA[0].upper()}{HOW_TO_GIVE_DATA[1:]}."]
    if gates["checks"]:
        lines += ["", "| gate | measured | limit | result |", "| --- | ---: | ---: | --- |"]
        for check in gates["checks"]:
            value = check["value"] if isinstance(check["value"], bool) else f"{check['value']:.4f}"
            lines.append(f"| `{check['option']}` ({check['what']}) | {value} | {check['limit']} | "
                         f"{'pass' if check['passed'] else '**FAIL**'} |")
        lines += [""] + [f"- FAILED {describe(c)}" for c in gates["checks"] if not c["passed"]]
    if report.get("mobile"):
        lines += ["", f"Mobile: {report['mobile']['verdict']}."]
    if accuracy:
        lines += ["", *_markdown_recall(accuracy)]
    if report.get("output_written") is False:
        lines += ["", "The output model was **not written** because a gate failed."]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _markdown_recall(accuracy: dict) -> list[str]:
    distortion = accuracy["distortion"]
    figure = distortion["intensification"]
    lines = ["<details><summary>Per-class recall (recall distortion: intensification "
             + (f"{figure:+.3f}" if figure is not None else "n/a") + ")</summary>", "",
             "| class | samples | recall before | recall after | change | relative to accuracy |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in accuracy["per_class"]:
        relative = f"{row['relative_change']:+.3f}" if row["relative_change"] is not None else "n/a"
        lines.append(f"| {row['class']} | {row['samples']} | {row['recall_before']:.2%} | {row['recall_after']:.2%} | "
                     f"{row['recall_change']:+.2%} | {relative} |")
    return lines + ["", "</details>"]
