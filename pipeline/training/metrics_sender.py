"""Rank 0's metric rows, sent to MLflow from a background thread.

A tracking server that is down for a while must neither stall nor crash training: the loop
only queues a row; the thread sends rows in step order and, when a send fails, keeps the row
and tries again every ``retry_s`` until the server answers. A row keeps the time it was queued
at, so sending it again after an answer was lost sends the same metric points, which MLflow's
store does not record twice. When training ends, ``close``
waits a bounded time for the queue to drain and counts, in a warning, the rows it could not
send. (MLflow's HTTP client retries on its own first: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` set how long one attempt may take.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

Send = Callable[[Mapping[str, float], int, int], None]  # metrics, step, time in ms


class MetricsSender:
    """``put(metrics, step)`` queues a row; a daemon thread calls ``send(metrics, step,
    timestamp_ms)``."""

    def __init__(self, send: Send, *, retry_s: float = 2.0, close_timeout_s: float = 120.0):
        self._send, self.retry_s, self.close_timeout_s = send, retry_s, close_timeout_s
        self._rows: deque[tuple[Mapping[str, float], int, int]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._abandoned = False  # close() gave up waiting: the thread must stop
        self.failures = 0  # failed attempts, over the whole run
        self.late = 0  # rows sent after at least one failed attempt
        self.unsent = 0  # rows left when close() gave up
        self._thread = threading.Thread(target=self._run, name="metrics-sender", daemon=True)
        self._thread.start()

    def put(self, metrics: Mapping[str, float], step: int) -> None:
        with self._wake:
            self._rows.append((dict(metrics), step, int(time.time() * 1000)))
            self._wake.notify()

    def close(self) -> int:
        """Wait up to ``close_timeout_s`` for the queued rows to be sent; return (and warn
        about) how many were not."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(self.close_timeout_s)
        with self._wake:
            self._abandoned = True
            left = list(self._rows)
            self._rows.clear()
        if left:
            log.warning(
                "%d metric rows (steps %d-%d) were not logged: the tracking server did not "
                "answer within %.0f s of the end of training",
                len(left),
                left[0][1],
                left[-1][1],
                self.close_timeout_s,
            )
        self.unsent = len(left)
        return self.unsent

    def counts(self) -> dict[str, int]:
        """Failed attempts, rows sent late and rows never sent (after ``close``)."""
        return {
            "metrics_send_failures": self.failures,
            "metrics_late": self.late,
            "metrics_unsent": self.unsent,
        }

    def _run(self) -> None:
        failing_since: float | None = None
        catch_up_to: int | None = None  # rows up to this step waited for the server
        while True:
            with self._wake:
                while not self._rows and not self._closing:
                    self._wake.wait()
                if not self._rows:
                    return
                metrics, step, timestamp_ms = self._rows[0]
            try:
                self._send(metrics, step, timestamp_ms)
            except Exception as err:  # whatever the client raises for a server that is away
                self.failures += 1
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "tracking server unreachable (%s: %s); metrics from step %d on are "
                        "kept and sent again every %.0f s",
                        type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "",
                        step,
                        self.retry_s,
                    )
                time.sleep(self.retry_s)
                if self._abandoned:
                    return
                continue
            with self._wake:
                if self._abandoned:
                    return
                self._rows.popleft()
                if failing_since is not None:  # the first row through after an outage
                    log.warning(
                        "tracking server back after %.0f s: sending the %d metric rows kept",
                        time.monotonic() - failing_since,
                        len(self._rows) + 1,
                    )
                    failing_since = None
                    catch_up_to = self._rows[-1][1] if self._rows else step
                if catch_up_to is not None and step <= catch_up_to:
                    self.late += 1


def send_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int
) -> None:
    """One batch write of a row's metrics, at the time the row was measured."""
    entries = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=entries)
