"""Temporary files: one run folder per process, removed at exit, and swept by a later run when the process
that held it is gone (killed); files staged beside an output go with it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from onnxprune import workdir

pytestmark = pytest.mark.skipif(workdir.fcntl is None, reason="the sweep needs flock (POSIX)")

ROOT = Path(__file__).resolve().parents[1]

# A child process that makes a temporary folder and stages a file beside tmp/out, then `END` ends it.
CHILD = """
import os, signal, sys
from pathlib import Path
from onnxprune import workdir
out = Path(sys.argv[1])
folder = workdir.temp_folder("probe-")
(Path(folder.name) / "probe.onnx").write_bytes(b"x" * 1000)
staged = workdir.staging_path(out)
staged.mkdir()
(staged / "model.onnx").write_bytes(b"x" * 1000)
print(workdir.run_folder(), flush=True)
"""


def child(tmp_path: Path, end: str) -> subprocess.Popen:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", CHILD + textwrap.dedent(end), str(tmp_path / "out")], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def everything(folder: Path) -> list[str]:
    """What is in `folder` but onnxruntime's `.ses` (an id it keeps in $TMPDIR once imported)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ".ses")


def test_a_killed_runs_folder_and_staged_files_are_removed_by_the_next_sweep(tmp_path):
    proc = child(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    run = Path(proc.stdout.readline().strip())
    assert proc.wait() == -9
    left = everything(tmp_path)
    assert any(name.endswith("probe.onnx") for name in left) and any(name.startswith("out/.onnxprune-") for name in left)
    assert workdir.sweep(tmp_path / "tmp") == [run]
    assert everything(tmp_path) == ["out", "tmp"]


def test_a_running_processs_folder_is_left_alone_and_removed_when_it_exits(tmp_path):
    proc = child(tmp_path, "sys.stdin.read()")  # runs until its stdin is closed
    run = Path(proc.stdout.readline().strip())
    assert workdir.sweep(tmp_path / "tmp") == []
    assert run.is_dir() and any(run.iterdir())
    proc.stdin.close()
    assert proc.wait() == 0
    assert everything(tmp_path) == ["out", "tmp"]  # at exit, with what it staged and never renamed into place


def test_this_processs_own_run_folder_survives_a_sweep():
    run = workdir.run_folder()
    assert run.name.startswith(f"{workdir.RUN_PREFIX}{os.getpid()}-")
    workdir.sweep()
    assert run.is_dir() and workdir.run_folder() == run


def test_a_journal_line_cut_short_by_the_kill_is_not_acted_on(tmp_path):
    dead = tmp_path / f"{workdir.RUN_PREFIX}1-abc"  # nobody holds its lock
    dead.mkdir()
    staged, user = tmp_path / ".onnxprune-1-ab", tmp_path / "model.onnx.data"
    staged.write_text("staged")
    user.write_text("the user's")
    (dead / workdir.JOURNAL).write_text(f"+{staged}\n+{user}")
    assert workdir.sweep(tmp_path) == [dead]
    assert everything(tmp_path) == ["model.onnx.data"]


def test_released_claims_are_kept(tmp_path):
    dead = tmp_path / f"{workdir.RUN_PREFIX}1-abc"
    dead.mkdir()
    kept = tmp_path / "model.onnx.data"
    kept.write_text("published")
    (dead / workdir.JOURNAL).write_text(f"+{kept}\n-{kept}\n")
    workdir.sweep(tmp_path)
    assert everything(tmp_path) == ["model.onnx.data"]


def test_a_kill_while_publishing_a_model_with_external_data_leaves_no_model(tmp_path):
    """The .data file moves first and the model last: killed between the two, there is no model, and the
    next sweep removes the .data file moved."""
    end = """
    real = os.replace
    def replace(source, target):
        if Path(target).name == "model.onnx":
            os.kill(os.getpid(), signal.SIGKILL)
        real(source, target)
    os.replace = replace
    (staged / "model.onnx.data").write_bytes(b"d" * 1000)
    workdir.publish([(staged / "model.onnx.data", out / "model.onnx.data"), (staged / "model.onnx", out / "model.onnx")])
    """
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_text("an older output")  # overwritten: removed before the new set moves
    proc = child(tmp_path, end)
    assert proc.wait() == -9
    assert (tmp_path / "out" / "model.onnx.data").exists() and not (tmp_path / "out" / "model.onnx").exists()
    workdir.sweep(tmp_path / "tmp")
    assert everything(tmp_path) == ["out", "tmp"]
