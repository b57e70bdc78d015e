"""The training's one tqdm bar on a terminal (step, loss, img/s, ETA), drawn by the driver.

Rank 0 is a Ray Train worker, maybe on another node, whose output reaches the driver only as
prefixed lines (``log_to_driver``); Ray's ``tqdm_ray`` drew nothing in a pty here. So rank 0
posts its state at each log step to a small named actor (``ProgressBoard``, no CPU; it works
across nodes, where a file would not), and a thread of the driver polls it and draws the bar
while ``trainer.fit()`` runs. Rank 0's per-step line then goes to Ray Train's worker log file
only (``<ray session>/logs/train/ray-train-app-worker-*.log``): on the console it would tear
the bar. Not a terminal: no board, and rank 0 logs the line as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import ray
from tqdm import tqdm

from pipeline.io.console import above_bar, format_duration, new_bar
from pipeline.training.progress import progress_line

log = logging.getLogger(__name__)

POLL_S = 0.5  # the driver reads the board this often


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest state rank 0 posted (a dict: step, steps, loss, images_per_s, eta_s)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def post(self, state: dict[str, Any]) -> None:
        self.state = state

    def read(self) -> dict[str, Any] | None:
        return self.state


class StepReporter:
    """Rank 0's side: the progress line to the console, or, when the driver draws a bar
    (``board``: the board actor's name), the state to the board and the line to the log files."""

    def __init__(self, board: str | None = None) -> None:
        self.board = None
        if board:
            try:
                self.board = ray.get_actor(board)
            except ValueError:  # the driver is gone or drew no bar: the plain line then
                log.warning("progress board %s not found: progress lines instead", board)

    def report(self, **values: Any) -> None:
        """``values``: the keyword arguments of ``progress_line``."""
        line = progress_line(**values)
        if self.board is None:
            log.info("%s", line)
            return
        state = {k: values[k] for k in ("step", "steps", "images_per_s", "eta_s")}
        self.board.post.remote({**state, "loss": values["losses"]["loss"]})  # no wait
        log_to_files(line)


def log_to_files(line: str) -> None:
    """``line`` to the root logger's file handlers only (Ray Train's worker log file), past
    its console handler."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (line,), None)
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if not console and record.levelno >= handler.level:
            handler.handle(record)


@contextlib.contextmanager
def training_bar(*, steps: int, enabled: bool) -> Iterator[str | None]:
    """While open, the bar of a training of ``steps`` steps, fed by the board it yields the
    name of (None when not ``enabled``: no bar, no board)."""
    if not enabled:
        yield None
        return
    name = f"maskrcnn-progress-{uuid.uuid4().hex[:12]}"
    board = ProgressBoard.options(name=name).remote()
    stop = threading.Event()
    with above_bar() as stream:
        drawer = _BarDrawer(board, steps=steps, stream=stream)
        thread = threading.Thread(target=drawer.run, args=(stop,), daemon=True, name=name)
        thread.start()
        try:
            yield name
        finally:
            stop.set()
            thread.join(timeout=10)
            drawer.draw()  # the last state rank 0 posted
            drawer.close()
            with contextlib.suppress(Exception):  # Ray may be going down with an error
                ray.kill(board)


class _BarDrawer:
    """The driver's thread: reads the board every ``POLL_S`` and draws what it holds."""

    def __init__(self, board: Any, *, steps: int, stream: Any) -> None:
        self.board, self.steps, self.stream = board, steps, stream
        self.bar: tqdm | None = None
        self.started = time.time()  # tqdm's clock: the bar's elapsed time is the training's

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(POLL_S):
            self.draw()

    def draw(self) -> None:
        try:
            state = ray.get(self.board.read.remote(), timeout=5)
        except Exception:  # a busy or dying Ray: the next poll tries again
            return
        if state is None:  # no step logged yet: no bar over the start-up lines
            return
        if self.bar is None:
            self.bar = new_bar(
                self.stream,
                total=self.steps,
                initial=state["step"],
                bar_format="step {n}/{total} |{bar}| {elapsed}{postfix}",
            )
            self.bar.start_t = self.started
        self.bar.n = state["step"]  # may go back: a restarted worker group resumes earlier
        self.bar.set_postfix_str(
            f"loss {state['loss']:.3f}, {state['images_per_s']:.1f} img/s, "
            f"ETA {format_duration(state['eta_s'])}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
