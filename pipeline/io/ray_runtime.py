"""One way to get a Ray runtime: join the configured cluster, or start a local one; and Ray's
own chatter kept off the console unless asked for (``verbose``, the stages' ``--verbose``).

Quiet means: Ray Data prints no per-execution lines ("Starting execution of Dataset ...",
"Execution plan ...", "execution finished", its periodic progress blocks) and no progress
bars (the stages draw their own, ``pipeline.io.console``): a training runs one execution per
epoch. Ray Data's full logs stay in
``<ray session>/logs/ray-data.log``. Ray Train's INFO lines
(per-rank checkpoint reports, worker group starts, failure-policy text) are quieted by the
trainer through its ``LoggingConfig``; they stay in Ray Train's log files.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.data import DataContext
from ray.train.v2._internal.execution import context as train_context  # a private module

from pipeline.io.network import check_reachable, free_port

log = logging.getLogger(__name__)

# Run in every Ray worker process of our job (Ray Train's controller and workers, Ray Data's
# actors and tasks) as it starts: the same quieting as in the driver.
SETUP_HOOK = f"{__name__}.quiet_worker_logs"
# "1": verbose without the flag (it reaches the stages that `dvc repro` runs).
VERBOSE_ENV = "MASKRCNN_VERBOSE"
# Ray's own default; a local Ray takes another free port when something listens there.
DASHBOARD_PORT = 8265
# Where Ray's state API clients (Ray Train's placement-group cleaner among them) look first.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def ensure_ray(
    address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False
) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; idempotent.

    ``num_cpus`` only applies to a local Ray started here. A plain ``ray.init()`` would attach to
    any cluster already running on this machine; ``address="local"`` always starts our own. It
    runs the dashboard: users watch jobs there, and Ray Train's placement-group cleaner polls the
    state API that the dashboard serves. ``verbose`` False quiets Ray's console output (the
    module docstring) in the driver and, through ``SETUP_HOOK``, in every worker process; a
    stage that passes its ``--verbose`` here first decides for the later calls (which return at
    once).

    The job's workers are told which cluster is theirs (``_runtime_env``): Ray Train's cleaner
    finds "its" state API by itself (``RAY_ADDRESS``, else the last ``ray start`` recorded in
    /tmp/ray, else port 8265), and when that is another cluster's dashboard it hears "no such
    controller" and removes the live run's placement group, killing its workers.
    """
    if ray.is_initialized():
        return
    verbose = verbose_requested(verbose)
    if not verbose:
        quiet_data_context(DataContext.get_current())
        _quiet_data_console()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_address(address)
        log.info("joining Ray cluster at %s", address)
        own = {"RAY_ADDRESS": address} if ":" in address and "://" not in address else {}
        ray.init(address=address, log_to_driver=True, runtime_env=_runtime_env(verbose, own))
    else:
        port, own = local_dashboard()
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_port=port,
            log_to_driver=True,
            runtime_env=_runtime_env(verbose, own),
        )
        log.info("started a local Ray runtime; dashboard: http://%s", context.dashboard_url)


def local_dashboard() -> tuple[int, dict[str, str]]:
    """A port for a local Ray's dashboard (``DASHBOARD_PORT`` when free), and the environment
    variable that sends its job's state API clients there (``ensure_ray``'s docstring)."""
    port = free_port(DASHBOARD_PORT)
    return port, {API_SERVER_ENV: f"http://127.0.0.1:{port}"}


def verbose_requested(flag: bool) -> bool:
    """The ``--verbose`` flag, or ``MASKRCNN_VERBOSE=1``."""
    return flag or os.environ.get(VERBOSE_ENV) == "1"


def _runtime_env(verbose: bool, env_vars: dict[str, str]) -> dict[str, Any]:
    """The job's runtime environment: ``env_vars`` in every worker, and the quieting hook unless
    ``verbose``."""
    hook = {} if verbose else {"worker_process_setup_hook": SETUP_HOOK}
    return {"env_vars": env_vars, **hook}


def quiet_data_context(context: DataContext) -> None:
    """No per-execution lines and no progress bars from the Ray Data executions of
    ``context``: preprocess and evaluate draw their own bar, or log their own lines
    (``pipeline.io.console``); the trainer hands its context to the workers and the split
    coordinator, and the driver draws the training's bar."""
    context.print_on_execution_start = False
    context.enable_progress_bars = False


def quiet_worker_logs() -> None:
    """Ray's worker_process_setup_hook (``SETUP_HOOK``): Ray Data's console at WARNING, and the
    per-report line of Ray Train's worker context ("Reporting training result ..."), which it
    logs through a logger named by its file path, past Ray Train's ``LoggingConfig``."""
    _quiet_data_console()
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _quiet_data_console() -> None:
    """Ray Data's console handler at WARNING (its file handler, ray-data.log, keeps all)."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # Ray's console handler
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_bars_disabled)


def _not_bars_disabled(record: logging.LogRecord) -> bool:
    """Drop Ray Data's warning that we turned its progress bars off: we did, on purpose."""
    return not str(record.msg).startswith("Progress bars disabled")


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
