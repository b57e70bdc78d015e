"""Helpers for end-to-end tests that start real servers (a Ray cluster, an MLflow server).

Everything such a test starts lives under one sandbox directory: its processes run there or
name it on their command line, so one sweep at the end finds and stops them all, also the ones
that Ray starts in sessions of their own (job drivers), and also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

STOP_GRACE_S = 5  # Ray's GCS and raylets take longer to exit on SIGTERM: no need to wait


def sandbox_processes(root: Path) -> list[psutil.Process]:
    """Processes that belong to the sandbox: they run in it or name it, or share a session
    with one that does (Ray workers rename themselves to ``ray::…``, hiding their arguments)."""
    me, mark = os.getpid(), str(root)
    found: dict[int, psutil.Process] = {}
    sessions: set[int] = set()
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if proc.pid == me:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
            if mark in cmdline or (proc.info["cwd"] or "").startswith(mark):
                found[proc.pid] = proc
                sessions.add(os.getsid(proc.pid))
        except (psutil.Error, OSError):
            continue
    sessions.discard(os.getsid(me))
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and os.getsid(proc.pid) in sessions:
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def stop_sandbox(root: Path) -> list[str]:
    """SIGTERM every sandbox process, SIGKILL what is left after a grace period; returns
    the processes that still would not die (empty when all is clean)."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5)):
        procs = sandbox_processes(root)
        if not procs:
            return []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(procs, timeout=grace)
    return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in sandbox_processes(root)]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    """A short-named directory (Unix socket paths must stay under 108 characters) whose
    processes are all stopped, and which is removed, when the module's tests are done."""
    root = Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))
    try:
        yield root
    finally:
        left = stop_sandbox(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes survived the teardown: {left}"
