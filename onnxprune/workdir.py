"""Where a run keeps its temporary files, and the removal of those a killed run left behind.

Each process gets one run folder, `onnxprune-run-<pid>-<random>` under the system temporary directory
($TMPDIR), created on first use and removed at exit. The process holds an exclusive `flock` on the folder
for its whole life: the kernel drops it however the process ends (SIGKILL too), so a later run can tell a
folder whose owner is gone. Files staged beside an output (written there so that the final rename is
atomic) are named `.onnxprune-<pid>-<random>` and listed in the run folder's `claims` journal first.
Creating its run folder, a run first sweeps: every run folder that no process holds any more is removed,
with the staged files its journal lists. Without `fcntl` (not a POSIX system) nothing is swept.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

RUN_PREFIX = "onnxprune-run-"
STAGING_PREFIX = ".onnxprune-"
JOURNAL = "claims"  # lines "+PATH" (remove PATH if the run dies) and "-PATH" (keep it after all)

_run: tuple[int, Path, int] | None = None  # (owner pid, folder, descriptor holding the lock)
_making = threading.Lock()  # one run folder however many threads ask at once


def run_folder() -> Path:
    """This process's run folder (created, after a sweep, on first use)."""
    global _run
    with _making:
        if _run is None or _run[0] != os.getpid():  # a forked child makes its own
            sweep()
            folder, fd = _locked_folder()
            _run = (os.getpid(), folder, fd)
            atexit.register(_remove_run_folder, os.getpid())
        return _run[1]


def temp_folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder inside the run folder, removed when the `with` block ends."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=run_folder())


def staging_path(directory: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh name in `directory` (beside an output) for a file or folder to stage there; a later run
    removes it if this one dies before renaming it into place."""
    path = Path(directory) / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    claim(path)
    return path


def claim(path: Path) -> None:
    """Record that `path` goes if this run dies (before `release(path)`)."""
    _journal(f"+{Path(path).absolute()}")


def release(path: Path) -> None:
    _journal(f"-{Path(path).absolute()}")


def publish(moves: list[tuple[Path, Path]]) -> None:
    """Rename staged files onto their targets; the last pair is the main file, which refers to the others.
    With companions, the old main file is removed first and the new one is moved last, so a kill leaves
    either no main file (the companions moved are then removed by a later run) or a complete set."""
    *companions, (main_source, main_target) = moves
    if companions:
        Path(main_target).unlink(missing_ok=True)
    for _, target in companions:
        claim(target)
    for source, target in companions:
        os.replace(source, target)
    os.replace(main_source, main_target)
    for _, target in companions:
        release(target)


def sweep(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the run folders in `root` (the system temporary directory) whose owner is gone, and the
    staged files they claimed; returns the folders removed."""
    if fcntl is None:
        return []
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{RUN_PREFIX}*"):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # removed meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner is running
            os.close(fd)
            continue
        try:
            _remove_claimed(folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _locked_folder() -> tuple[Path, int]:
    while True:
        folder = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is None:
            return folder, fd
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another run's sweep, which saw it unlocked, removes it
        try:
            if os.stat(folder).st_ino == os.fstat(fd).st_ino:
                return folder, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _journal(line: str) -> None:
    with open(run_folder() / JOURNAL, "a") as journal:
        journal.write(line + "\n")


def _remove_claimed(folder: Path) -> None:
    try:
        text = (folder / JOURNAL).read_text()
    except OSError:
        return
    claimed = {}
    for line in text.split("\n")[:-1]:  # a line the kill cut short has no newline: not acted on
        claimed[line[1:]] = line.startswith("+")
    for name, live in claimed.items():
        path = Path(name)
        if not live:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _remove_run_folder(owner: int) -> None:
    global _run
    if _run is None or _run[0] != owner or os.getpid() != owner:
        return
    _, folder, fd = _run
    _run = None
    _remove_claimed(folder)
    shutil.rmtree(folder, ignore_errors=True)
    os.close(fd)
