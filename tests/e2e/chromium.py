"""Headless Chromium (the Debian package) as a test's browser: the DOM of a page after its
scripts ran, and a screenshot of it.

``--virtual-time-budget`` lets the page's timers run for that much virtual time; Chromium
pauses virtual time while network fetches are pending, so a React app that fetches its data
from a slow server still renders before the DOM is dumped (and a fetch that never ends stalls
it: hence no background networking).
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

BINARY = "chromium"
INSTALL = "apt-get update && apt-get install -y chromium  (or: make browser)"
WINDOW = "1400,1800"  # tall: the UI draws only the charts inside the window
HARD_TIMEOUT_S = 60  # real seconds allowed beyond the virtual-time budget
_HIDDEN = re.compile(r"<(script|style|svg)\b.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")


def binary() -> str | None:
    return shutil.which(BINARY)


def render(url: str, *, screenshot: Path, profile: Path, budget_ms: int = 15000) -> str:
    """The page's DOM after ``budget_ms`` of virtual time; the screenshot goes to ``screenshot``,
    the DOM and Chromium's log beside it (``.html``, ``.log``). ``profile``: a fresh user-data
    directory (nothing from another run: no stored UI state)."""
    command = [
        binary() or BINARY,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        # A fresh profile's background fetches (component updates, sync) would wait forever
        # for a network that may not be there, and virtual time stands still while they wait.
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    dom_path, log_path = screenshot.with_suffix(".html"), screenshot.with_suffix(".log")
    # Files, not pipes: a helper process that outlives the browser would hold a pipe open.
    with dom_path.open("w") as dom, log_path.open("w") as log:
        browser = subprocess.Popen(
            command, stdout=dom, stderr=log, start_new_session=True
        )  # a session of its own: its renderer and GPU processes are killed with it
        try:
            browser.wait(timeout=HARD_TIMEOUT_S + budget_ms / 1000)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"chromium did not finish {url} in time") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)  # what is left of its session
            browser.wait()
    page = dom_path.read_text(errors="replace")
    if browser.returncode != 0 or not page:
        errors = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"chromium failed on {url} ({browser.returncode}):\n{errors}")
    return page


def text(dom: str) -> str:
    """The visible text of a DOM, whitespace collapsed."""
    visible = _TAG.sub(" ", _HIDDEN.sub(" ", dom))
    return " ".join(html.unescape(visible).split())
