"""What the stages show of their progress: one tqdm bar when a person watches (stderr, where
the logs and the bar go, is a terminal), a plain line every ``LINE_EVERY_S`` seconds when
nobody does (CI, a log file), where a bar would be a stream of carriage returns.

While a bar is up, ``above_bar`` sends every other line (our logging, Ray's worker lines
that ``log_to_driver`` prints, stray prints) through tqdm, above the bar, so the bar stays one
line instead of being torn by them (docs/training.md, "Logs and progress").
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

LINE_EVERY_S = 10.0  # seconds between two plain progress lines (tests set 0: one per update)


def on_terminal() -> bool:
    """Whether stderr (the logs' and the bar's stream) is a terminal."""
    return sys.stderr.isatty()


def new_bar(stream: TextIO, **options: Any) -> tqdm:
    """A tqdm bar on ``stream`` (``options``: tqdm's), as wide as the terminal. A terminal that
    reports a size of 0 x 0 (a pty nobody sized, as ``script`` run off a terminal makes) gets
    80 x 24:
    there tqdm would draw nothing at all, and a bar that exists but does not show helps nobody."""
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        columns = lines = 0
    size = {"dynamic_ncols": True} if columns and lines else {"ncols": 80, "nrows": 24}
    return tqdm(file=stream, **size, **options)


def format_duration(seconds: float) -> str:
    """``0:01:14``: hours, minutes, seconds."""
    seconds = max(round(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _AboveBar:
    """A stream whose complete lines go out with the bars on ``bar_stream`` cleared first and
    redrawn after (tqdm's ``external_write_mode``); everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO, bar_stream: TextIO) -> None:
        self._stream, self._bar_stream, self._pending = stream, bar_stream, ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        if lines:
            with tqdm.external_write_mode(file=self._bar_stream):
                self._stream.write("".join(line + "\n" for line in lines))
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def close_pending(self) -> None:
        if self._pending:
            self.write("\n")

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def above_bar() -> Iterator[TextIO]:
    """Lines printed or logged meanwhile appear above the bars; yields the stream to draw the
    bars on (the real stderr). Logging handlers keep their levels, filters and formats: only
    the stream of those that write to stdout or stderr changes (Ray Data's and MLflow's
    loggers have their own), as do ``sys.stdout`` and ``sys.stderr``, which Ray's printing of
    worker lines looks up at each line."""
    stdout, stderr = sys.stdout, sys.stderr
    wrapped = {id(stdout): _AboveBar(stdout, stderr), id(stderr): _AboveBar(stderr, stderr)}
    handlers = [h for h in _stream_handlers() if id(h.stream) in wrapped]
    previous = [h.setStream(wrapped[id(h.stream)]) for h in handlers]  # type: ignore[arg-type]
    sys.stdout, sys.stderr = wrapped[id(stdout)], wrapped[id(stderr)]  # type: ignore[assignment]
    try:
        yield stderr
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        for handler, stream in zip(handlers, previous, strict=True):
            handler.setStream(stream)
        for wrapper in wrapped.values():
            wrapper.close_pending()


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every logger's handlers that write to a stream they hold (not files)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        handler
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for handler in logger.handlers
        if type(handler).__dict__.get("stream") is None  # not a stream looked up at each line
        and isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]


class ImageProgress:
    """Progress over ``total`` images named ``what`` ("preprocess train"): a tqdm bar on a
    terminal, else ``what: 128/400 images (32%), 12.3 img/s, ETA 0:00:22`` at most every
    ``LINE_EVERY_S`` seconds; nothing at all when not ``enabled``. A context manager."""

    def __init__(self, what: str, *, total: int, enabled: bool = True) -> None:
        self.what, self.total, self.done, self.enabled = what, total, 0, enabled
        self._stack = contextlib.ExitStack()
        self._bar: tqdm | None = None
        self._start = self._last_line = time.perf_counter()

    def __enter__(self) -> ImageProgress:
        self._start = self._last_line = time.perf_counter()
        if self.enabled and on_terminal():
            stream = self._stack.enter_context(above_bar())
            self._bar = new_bar(
                stream,
                total=self.total,
                desc=self.what,
                unit=" img",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images "
                "[{elapsed}<{remaining}, {rate_noinv_fmt}]",
            )
        return self

    def add(self, images: int) -> None:
        self.done += images
        if self._bar is not None:
            self._bar.update(images)
            return
        now = time.perf_counter()
        if self.enabled and now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            log.info("%s", self.line(now - self._start))

    def line(self, elapsed_s: float) -> str:
        rate = self.done / max(elapsed_s, 1e-9)
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.what}: {self.done}/{self.total} images "
            f"({self.done / max(self.total, 1):.0%}), {rate:.1f} img/s, ETA {eta}"
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        self._stack.close()
