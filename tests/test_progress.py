"""Progress bars are drawn on a terminal only, and never with --quiet."""

from __future__ import annotations

import io

from onnxprune import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn(monkeypatch, stderr) -> str:
    monkeypatch.setattr("sys.stderr", stderr)
    assert list(progress.bar(range(3), "work", total=3)) == [0, 1, 2]
    return stderr.getvalue()


def test_a_bar_is_drawn_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "enabled", True)  # as the CLI leaves it without --quiet
    assert "work" in drawn(monkeypatch, Terminal())


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    assert drawn(monkeypatch, io.StringIO()) == ""


def test_no_bar_when_turned_off(monkeypatch):
    monkeypatch.setattr(progress, "enabled", False)
    assert drawn(monkeypatch, Terminal()) == ""
