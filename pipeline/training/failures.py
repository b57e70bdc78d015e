"""A worker failure in a few lines: which rank, on which node, why, and where training resumes.

Ray Train's controller reports a failed worker with several screens of text (the worker's
metadata, the actor-death message, once per retry decision). :class:`FailureSummary` runs in
the controller, as a Ray Train ``UserCallback``: for each failed rank it logs one warning line,
and appends Ray's full text to ``<run directory>/failures.log`` (``FAILURE_LOG``). With
``--verbose`` Ray Train's own text comes back on the console too (``trainer.make_trainer``).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from ray.train import ControllerError, UserCallback
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # private module

from pipeline.config.errors import UserError
from pipeline.io import storage

log = logging.getLogger(__name__)

FAILURE_LOG = "failures.log"
_NODE = re.compile(r"node_ip='([^']+)'|\bip: (\S+)")
_HOST = re.compile(r"hostname='([^']+)'")
_EXIT_DETAIL = re.compile(r"Worker exit detail: ([^.]+)")


class FailureSummary(UserCallback):
    """Counts the failures and remembers the last checkpointed step (from the reports), so that
    a failure can say where the restarted worker group resumes."""

    def __init__(self, *, run_dir: str, max_failures: int) -> None:
        self.run_dir, self.max_failures = run_dir, max_failures
        self.failures = 0
        self.checkpointed_step = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if checkpoint is not None and metrics:
            self.checkpointed_step = int(metrics[0].get("step", self.checkpointed_step))

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]):
        self.failures += 1
        for line in summary_lines(
            worker_exceptions,
            failure=self.failures,
            max_failures=self.max_failures,
            step=self.checkpointed_step,
        ):
            log.warning("%s", line)
        self._keep_full_text(worker_exceptions)

    def _keep_full_text(self, worker_exceptions: dict[int, Exception]) -> None:
        """Append Ray's text to the log file; a log that cannot be written costs a warning."""
        path = storage.join(self.run_dir, FAILURE_LOG)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(
            f"==== {stamp} failure {self.failures}, rank {rank} ====\n{error}\n"
            for rank, error in sorted(worker_exceptions.items())
        )
        try:
            old = storage.read_bytes(path) if storage.exists(path) else b""
            storage.write_bytes(path, old + text.encode())
        except OSError as err:
            log.warning("could not write %s: %s", path, err)
            return
        log.warning("Ray's full text of the failure: %s", path)


def summary_lines(
    worker_exceptions: dict[int, Exception], *, failure: int, max_failures: int, step: int
) -> list[str]:
    """``worker failure 1 of at most 1: rank 1 on node 10.0.0.2 (vm): the worker process
    died (...)``, one per rank, then what happens next."""
    lines = [
        f"worker failure {failure} (train.max_failures={max_failures}): rank {rank} on "
        f"{node_of(error)}: {reason_of(error)}"
        for rank, error in sorted(worker_exceptions.items())
    ]
    if max_failures < 0 or failure <= max_failures:
        lines.append(f"restarting the worker group, resuming from step {step}")
    else:
        lines.append("no restarts left (train.max_failures): the run fails")
    return lines


def node_of(error: BaseException) -> str:
    """The node's IP address (and host name) as Ray's text gives them; "an unknown node"."""
    text = str(error)
    node = _NODE.search(text)
    if not node:
        return "an unknown node"
    host = _HOST.search(text)
    address = node.group(1) or node.group(2)
    return f"node {address} ({host.group(1)})" if host else f"node {address}"


def reason_of(error: BaseException) -> str:
    """Why, in one line: the worker process's exit detail when it died, else the last line of
    the error (a Python exception's ``Type: message``)."""
    text = str(error)
    detail = _EXIT_DETAIL.search(text)
    if detail:
        return f"the worker process died ({detail.group(1).strip()})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def start_failure(error: BaseException, *, num_workers: int, run_dir: str) -> UserError | None:
    """Ray Train's "the worker group did not start in time", ``train.max_failures`` + 1 times
    over, as the user's problem it is: the cluster lacks what the workers ask for (a node lost
    mid-run, or never there). None for any other error."""
    if not isinstance(error, ControllerError) or not isinstance(
        error.controller_failure, WorkerGroupStartupTimeoutError
    ):
        return None
    return UserError(
        f"Ray could not start the {num_workers} training workers in time, as often as "
        "train.max_failures allows: the cluster lacks the CPUs/GPUs they ask for (a node lost? "
        "`ray status` shows what is left). Once it has them, rerun with the same run name: "
        f"training resumes from the last checkpoint in {run_dir}"
    )
