"""Fail fast when a server the configuration names does not answer.

MLflow's client retries a refused connection for minutes, and ``ray.init`` waits for a cluster
that is not there about as long: to a user both read as a hang. One TCP connection, with a
short timeout, tells at once.
"""

from __future__ import annotations

import socket

from pipeline.config.errors import Unreachable

PROBE_TIMEOUT_S = 3.0


def check_reachable(host: str, port: int, *, service: str, fix: str) -> None:
    """Unreachable (``<service> at host:port does not answer (why): <fix>``) unless a TCP
    connection opens."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return
    except OSError as err:
        why = err.strerror or str(err) or type(err).__name__
        raise Unreachable(f"{service} at {host}:{port} does not answer ({why}): {fix}") from None


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if nothing listens there on this machine, else a port the OS has free."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise AssertionError("the OS had no free port")
