"""Progress on the console (pipeline.io.console), without Ray: the plain line off a terminal,
at most one per interval; one bar on a terminal, with the other lines printed above it."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pty
import re
import select
import sys

import pytest

from pipeline.io import console

LINE = r"preprocess train: {done}/4 images \({pct}%\), [\d.]+ img/s, ETA (\d:\d\d:\d\d|\?)"


class FakeTerminal(io.StringIO):
    """What tqdm and ``on_terminal`` take for a terminal (one that reports no size)."""

    def isatty(self) -> bool:
        return True


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == console.log.name]


def test_plain_lines_off_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(console, "LINE_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO), console.ImageProgress("preprocess train", total=4) as p:
        p.add(1)
        p.add(3)
    first, last = _lines(caplog)
    assert re.fullmatch(LINE.format(done=1, pct=25), first), first
    assert re.fullmatch(LINE.format(done=4, pct=100), last), last
    assert last.endswith("ETA 0:00:00")


def test_at_most_one_line_per_interval_and_none_when_disabled(caplog):
    with caplog.at_level(logging.INFO):
        with console.ImageProgress("preprocess train", total=4) as p:
            p.add(4)  # well within LINE_EVERY_S of the start
        with console.ImageProgress("preprocess train", total=4, enabled=False) as p:
            p.add(4)
    assert _lines(caplog) == []


def test_one_bar_on_a_terminal_and_the_other_lines_above_it(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)  # as basicConfig's, on the terminal
    logging.getLogger().addHandler(handler)
    try:
        with console.ImageProgress("preprocess train", total=4) as p:
            p.add(2)
            logging.getLogger("somewhere").warning("a log line")
            print("a printed line")
            print("a line in", end="")
            print(" two writes")
            p.add(2)
    finally:
        logging.getLogger().removeHandler(handler)
    assert sys.stderr is terminal  # restored
    output = terminal.getvalue()
    # What each line shows in the end: the text after its last carriage return.
    shown = [part.rsplit("\r", 1)[-1] for part in output.split("\n")]
    assert {"a log line", "a printed line", "a line in two writes"} <= set(shown), shown
    assert re.search(r"preprocess train: 100%\|[^|]+\| 4/4 images \[", output), output
    assert "images (" not in output  # no plain line as well


def test_a_terminal_of_no_size_gets_a_bar_that_shows():
    """``script`` and ``docker exec -t`` give a 0 x 0 pty, where tqdm would draw nothing."""
    master, slave = pty.openpty()  # 0 x 0 until someone sizes it
    try:
        with os.fdopen(slave, "w") as terminal:
            assert os.get_terminal_size(terminal.fileno()) == (0, 0)
            bar = console.new_bar(terminal, total=2)
            bar.update(1)
            bar.close()
        shown = b""
        with contextlib.suppress(OSError):  # EIO once read to the end: the other side is closed
            while select.select([master], [], [], 0.2)[0]:
                shown += os.read(master, 1 << 16)
        assert "1/2" in shown.decode()
    finally:
        os.close(master)
