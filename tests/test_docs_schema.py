"""docs/report-schema.md documents the JSON reports: every key a real report has is documented, and every
key documented as always present is there."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxprune.cli import main
from onnxprune.report import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "report-schema.md"
MODEL = ROOT / "models" / "mnist_resnet.onnx"
EVAL = ROOT / "models" / "mnist_calib.npz"
SWEEP_HEADING = "## The sweep report"
# sections documented key by key; other sections (owned by other stages) are documented as a whole
DETAILED = ("fidelity", "gates", "accuracy", "latency", "mobile", "sparsity", "quantize")
# objects keyed by names that depend on the model (outputs) or on onnxruntime (providers)
NAMED_CHILDREN = {"mobile.execution_providers": "<provider>", "latency.model.multiples": "<multiple>",
                  "latency.round_to": "<multiple>"}
OPAQUE = {"fidelity.per_output", "fidelity.in_sample.per_output"}


def documented(text: str) -> dict[str, str]:
    """{path: present} from the table rows of a part of the document."""
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| ([^|]+) \|", text, flags=re.MULTILINE)
    return {path: present.strip() for path, present in rows}


def doc_parts() -> tuple[dict, dict]:
    text = DOC.read_text()
    prune_part, sweep_part = text.split(SWEEP_HEADING)
    return documented(prune_part), documented(sweep_part)


def flatten(value, path: str = ""):
    """Dotted paths of every key; a list of objects is `path[]`; model-dependent names are placeholders."""
    if path in OPAQUE:
        return
    if isinstance(value, dict):
        for key, child in value.items():
            name = NAMED_CHILDREN.get(path, key)
            yield from _child(child, f"{path}.{name}" if path else name)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for item in value:
            yield from flatten(item, path)


def _child(child, path):
    if isinstance(child, list) and child and isinstance(child[0], dict):
        yield path
        yield path + "[]"
        yield from flatten(child, path + "[]")
    else:
        yield path
        if isinstance(child, dict):
            yield from flatten(child, path)


def check(report: dict, docs: dict[str, str], detailed_prefixes) -> None:
    paths = set(flatten(report))
    top_level = {p for p in paths if "." not in p and "[" not in p}
    paths |= {p.removesuffix("[]") for p in paths if p.endswith("[]")}
    detailed = {p for p in paths if p.split(".")[0].split("[")[0] in detailed_prefixes}
    undocumented = sorted((top_level | detailed) - set(docs) - {p.removesuffix("[]") for p in docs})
    assert not undocumented, f"document these report keys in {DOC.name}: {undocumented}"
    # "always" inside a section means: whenever that section is in the report
    sections = {p for p in paths if "." not in p}
    required = [p for p, present in docs.items() if present == "always" and _section(p) in sections | {p}]
    missing = sorted(p for p in required if p not in paths)
    assert not missing, f"documented as always present but missing: {missing}"


def _section(path: str) -> str:
    return path.split(".")[0].removesuffix("[]")


def test_the_document_is_for_this_schema_version():
    assert f"schema version {SCHEMA_VERSION}" in DOC.read_text().splitlines()[0]


def test_every_prune_report_key_is_documented(tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(MODEL), str(tmp_path / "out.onnx"), "--filters", "0.25", "--eval",
                                       str(EVAL), "--latency", "--latency-runs", "3", "--mobile",
                                       "--min-cosine", "0", "--max-macs", "1", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    prune_docs, _ = doc_parts()
    check(report, prune_docs, DETAILED)


def test_every_key_of_a_latency_target_report_is_documented(tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(MODEL), str(tmp_path / "out.onnx"), "--target-speedup", "1.1",
                                       "--min-cosine", "0", "--latency-runs", "3", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert "rounds" in report["latency"]
    check(report, doc_parts()[0], DETAILED)


def test_every_key_of_a_report_on_held_out_samples_is_documented(tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(MODEL), str(tmp_path / "out.onnx"), "--filters", "0.25", "--calib", str(EVAL),
                                       "--scorer", "l1", "--recover", "bias", "--min-cosine", "0",
                                       "--sparsity", "0.3", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["data"]["held_out"] and "in_sample" in report["fidelity"]
    check(report, doc_parts()[0], DETAILED)


def test_every_key_of_a_quantized_report_is_documented(tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(MODEL), str(tmp_path / "out.onnx"), "--filters", "0.25", "--calib", str(EVAL),
                                       "--calib-samples", "64", "--scorer", "l1", "--quantize", "int8", "--latency", "--min-cosine", "0",
                                       "--latency-runs", "3", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    check(json.loads(report_path.read_text()), doc_parts()[0], DETAILED)


def test_every_sweep_report_key_is_documented(tmp_path):
    table_path = tmp_path / "sweep.json"
    result = CliRunner().invoke(main, ["sweep", str(MODEL), "--eval", str(EVAL), "--filters", "0.5",
                                       "--latency", "--latency-runs", "3", "--report", str(table_path)])
    assert result.exit_code == 0, result.output
    _, sweep_docs = doc_parts()
    table = json.loads(table_path.read_text())
    check(table, sweep_docs, ("settings", "sensitivity"))


@pytest.mark.parametrize("key", ["schema_version", "gates.checks[].value", "accuracy.distortion.intensification"])
def test_the_parser_reads_the_tables(key):
    assert key in doc_parts()[0]
