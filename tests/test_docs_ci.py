"""The CI recipe in docs/ works: every `run:` step of docs/github-actions-prune.yml (but the install) runs
with bash, in order, as GitHub Actions would run it, in a scratch checkout holding the shipped model.

The scratch checkout's data files are prefixes of the shipped ones (same names, fewer samples) so that the
data-driven stages stay quick; the commands themselves are run exactly as documented.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "github-actions-prune.yml"
SAMPLES = {"mnist_calib.npz": 64, "mnist_eval.npz": 300}


def run_steps(text: str) -> list[tuple[str, str]]:
    """(step name, script) for each `run:` of the workflow; block scalars (`run: |`) de-indented."""
    lines = text.splitlines()
    steps, name = [], ""
    for i, line in enumerate(lines):
        named = re.match(r"^\s*- name: (.*)$", line)
        if named:
            name = named.group(1)
        found = re.match(r"^\s*(?:- )?run: (.+)$", line)
        if not found:
            continue
        if found.group(1).strip() != "|":
            steps.append((name, found.group(1) + "\n"))
            continue
        block, indent = [], None
        for follow in lines[i + 1:]:
            if not follow.strip():
                block.append("")
                continue
            depth = len(follow) - len(follow.lstrip())
            indent = depth if indent is None else indent
            if depth < indent:
                break
            block.append(follow[indent:])
        steps.append((name, "\n".join(block).strip() + "\n"))
    return steps


@pytest.fixture
def checkout(tmp_path):
    """A scratch working directory shaped like the repository: models/ with the model and data."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(ROOT / "models" / "mnist_resnet.onnx", models)
    for name, count in SAMPLES.items():
        with np.load(ROOT / "models" / name) as data:
            np.savez(models / name, **{key: data[key][:count] for key in data.files})
    return tmp_path


def test_the_workflow_parser_finds_the_steps():
    names = [name for name, _ in run_steps(WORKFLOW.read_text())]
    assert names == ["Install onnxprune", "Prune with quality gates", "Show the summary on the job page",
                     "Read the report", "Re-apply the plan", "Sweep"]


def test_every_documented_ci_step_runs(checkout):
    summary = checkout / "step_summary.md"
    summary.touch()
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name, script in run_steps(WORKFLOW.read_text()):
        if "pip install" in script:
            continue  # the package under test is installed already
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=checkout,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"step {name!r} failed:\n{done.stdout}\n{done.stderr}"
        if name == "Read the report":
            assert "gates passed: True" in done.stdout
    build = checkout / "build"
    report = json.loads((build / "report.json").read_text())
    assert report["gates"]["passed"] and report["output_written"] and report["data"]["samples"] == 300
    for produced in ("mnist_pruned.onnx", "mnist_pruned.ort", "plan.json", "from_plan.onnx", "sweep.json"):
        assert (build / produced).is_file(), produced
    assert (build / "mnist_pruned.onnx").read_bytes() == (build / "from_plan.onnx").read_bytes()
    assert "## onnxprune" in summary.read_text() and "| gate | measured | limit | result |" in summary.read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (build / "sweep.png").read_bytes().startswith(b"\x89PNG")
