"""What counts as the user's mistake, and how every command line reports one.

A stage stopped by its input or setup (a COCO file whose image ids repeat, a typo in
params.yaml, a missing model file, a tracking server or Ray cluster that does not answer)
prints ``error: <what, where, what to do>`` on stderr and exits 1: a traceback would read as
a crash of the program. Anything else is a bug and keeps its traceback. ``--traceback`` on any
stage's command line, or ``MASKRCNN_TRACEBACK=1`` in the environment, shows the traceback of
user errors too, for debugging.

User errors are ``UserError`` (raised by our code where nothing in the standard library fits),
``ValueError`` (validation of data and params, ``pipeline.coco.reader.DataError`` included),
``OSError`` (a missing or unreadable file, a refused connection) and ``FloatingPointError`` (a
training whose loss stopped being finite: the message says which setting to change). Raised in
a Ray task or a Ray Train worker, they arrive wrapped; the original is what counts.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "MASKRCNN_TRACEBACK"

_R = TypeVar("_R")


class UserError(Exception):
    """Stopped by the user's input or setup; the message says what, where and what to do."""


class Unreachable(UserError):
    """A server that the configuration names (MLflow tracking, a Ray cluster) does not answer."""


USER_ERRORS = (UserError, ValueError, OSError, FloatingPointError)


def is_user_error(error: BaseException) -> bool:
    return isinstance(_cause(error), USER_ERRORS)


def describe(error: BaseException) -> str:
    """The message of a user error, without the noise a traceback-free line does not need."""
    error = _cause(error)
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return str(error) or type(error).__name__


def command(main: Callable[[list[str]], _R]) -> Callable[[Sequence[str] | None], _R]:
    """Wrap a command line's ``main(argv)``: a user error ends it with ``error: ...`` and
    exit status 1 (a ``SystemExit`` holding that line, so in-process callers can catch it),
    unless ``--traceback`` is among the arguments (removed before ``main`` sees them) or
    ``MASKRCNN_TRACEBACK`` is set."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> _R:
        args = list(sys.argv[1:] if argv is None else argv)
        show = TRACEBACK_FLAG in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
        args = [arg for arg in args if arg != TRACEBACK_FLAG]
        if show:
            return main(args)
        try:
            return main(args)
        except Exception as error:
            if not is_user_error(error):
                raise
            # Python prints a SystemExit's text on stderr and exits with status 1.
            raise SystemExit(f"error: {describe(error)}") from None

    return run


def _cause(error: BaseException) -> BaseException:
    """The original error: Ray re-raises a remote task's exception as a ``RayTaskError`` whose
    text holds the remote traceback (the original is its ``cause``), and Ray Train a worker's
    as a ``WorkerGroupError`` (``worker_failures``: rank -> error; the lowest rank's counts)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return _cause(cause)
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return _cause(failures[min(failures)])
    return error
