"""One way to get a Ray runtime: join the configured cluster, or start a local one."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.io.network import check_reachable

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; idempotent.

    ``num_cpus`` only applies to a local Ray started here. A plain ``ray.init()`` would attach to
    any cluster already running on this machine; ``address="local"`` always starts our own. It
    runs the dashboard: users watch jobs there, and Ray Train's placement-group cleaner polls the
    state API that the dashboard serves (without it, it warns every second).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_address(address)
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        context = ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True
        )
        log.info("started a local Ray runtime; dashboard: http://%s", context.dashboard_url)


def _check_address(address: str) -> None:
    """A ``host:port`` (or ``ray://host:port``) that does not answer is an error at once, where
    ``ray.init`` would wait minutes; "auto" is left to Ray."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if colon and port.isdigit():
        check_reachable(
            host,
            int(port),
            service="the Ray cluster",
            fix="start it (`ray start --head`), or set ray.address in params.yaml (null: a "
            "local Ray) and RAY_ADDRESS to one that runs",
        )


def cluster_node_count() -> int:
    """Alive nodes in the connected cluster (1 for a local Ray)."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))
