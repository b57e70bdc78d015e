"""MLflow tracking: where runs go, one run per pipeline execution, and the handle to it.

The driver creates (or reopens) the run before training starts, so the run id exists even if
every worker dies; rank 0 attaches to it by id; ``run.json`` hands the id to evaluate and
register. URIs are resolved to absolute ones here, because Ray workers run in other
directories and, on a cluster, on other machines.

The experiment is marked as a model-training one (``mlflow.experimentKind``): without the tag,
MLflow 3's UI may open it on its GenAI overview (traces, token usage) instead of the runs.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.io.network import check_reachable
from pipeline.registry.lineage import source_tags

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
PROJECT_MARKERS = ("params.yaml", "pyproject.toml")
LOCAL_SCHEMES = ("", "file", "sqlite")
NAMED_REMOTES = ("databricks", "databricks-uc")  # URIs that are a bare word, not a path
HTTP_PORTS = {"http": 80, "https": 443}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what MLflow 3's UI reads to pick its views
TRAINING_KIND = "custom_model_development"


@dataclass(frozen=True, kw_only=True)
class RunRef:
    """Enough to reattach to an MLflow run from another process or stage."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> RunRef:
        """The run file a training wrote (run.json); a ValueError names a missing or bad one."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: str(data[k]) for k in ("run_id", "experiment_id", "tracking_uri")})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable run file ({err})") from err


def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding params.yaml or
    pyproject.toml."""
    here = Path(start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if any((directory / marker).exists() for marker in PROJECT_MARKERS):
            return directory
    raise ValueError(f"no project root (a directory with {PROJECT_MARKERS}) at or above {here}")


def resolve_tracking_uri(uri: str | None, *, project_root: Path) -> str:
    """An absolute tracking URI: None -> ``sqlite:///<root>/mlflow.db``; relative SQLite or
    file-store paths are taken relative to ``project_root``; servers are returned unchanged."""
    root = Path(project_root).resolve()
    if uri in NAMED_REMOTES:
        return uri
    if not uri:
        return f"sqlite:///{root / DEFAULT_DB}"
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return uri
        return f"sqlite:///{(root / path).resolve()}"
    if parsed.scheme == "file":
        path = parsed.netloc + parsed.path
        return (root / path).resolve().as_uri()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a bare path (or a Windows drive)
        return (root / uri).resolve().as_uri()
    return uri


def is_local_uri(uri: str) -> bool:
    """True for stores that live on this machine's disk: a path, ``file:`` or ``sqlite:``."""
    if uri in NAMED_REMOTES:
        return False
    scheme = urlparse(uri).scheme
    return scheme in LOCAL_SCHEMES or len(scheme) == 1


def check_uri_for_cluster(uri: str, *, node_count: int) -> None:
    """Refuse a local tracking store when training may log from another node."""
    if node_count > 1 and is_local_uri(uri):
        raise ValueError(
            f"tracking.uri {uri!r} is a local store, but the Ray cluster has {node_count} "
            "nodes: rank 0 may run on another node and would write to that node's disk. "
            "Run a tracking server that every node can reach, for example "
            "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 "
            "--port 5000`, and set tracking.uri to its address (http://<host>:5000)."
        )


def check_server(uri: str, *, setting: str = "tracking.uri") -> None:
    """Fail at once, saying what to do, when ``uri`` is an HTTP tracking server that does not
    answer (MLflow's client would retry for minutes). ``setting``: where the URI came from.
    A server behind an HTTP proxy is left to MLflow: only the proxy would answer a probe."""
    parsed = urlparse(uri)
    if parsed.scheme not in HTTP_PORTS or not parsed.hostname:
        return
    if parsed.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(
        parsed.hostname
    ):
        return
    check_reachable(
        parsed.hostname,
        parsed.port or HTTP_PORTS[parsed.scheme],
        service="the MLflow tracking server",
        fix=(
            "start it (`mlflow server --backend-store-uri sqlite:///mlflow.db --port "
            f"{parsed.port or HTTP_PORTS[parsed.scheme]}`) or set {setting} to a server that "
            "runs (null: the project's SQLite file)"
        ),
    )


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: ``{"model": {"rpn": {"nms_thresh": 0.7}}}`` ->
    ``{"model.rpn.nms_thresh": "0.7"}``; sequences become their JSON text."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = str(value)
    return flat


def open_or_create_run(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    project_root: Path,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunRef:
    """Reopen run ``run_id`` if the store still has it, else create a run in ``experiment``.

    A new experiment in a local store keeps its artifacts under ``<project_root>/mlruns``
    (MLflow would otherwise pick the current directory of whoever created it). A new run gets
    the ``mlflow.source.*`` tags (entry point, git commit) besides ``tags``. The experiment is
    marked as a training one, also one created earlier without the mark.
    """
    client = MlflowClient(tracking_uri)
    if run_id:
        try:
            run = client.get_run(run_id)
            mark_training_experiment(client, run.info.experiment_id)
            return RunRef(
                run_id=run.info.run_id,
                experiment_id=run.info.experiment_id,
                tracking_uri=tracking_uri,
            )
        except mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s is not in %s; starting a new run", run_id, tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
        mark_training_experiment(client, experiment_id)
    else:
        location = None
        if is_local_uri(tracking_uri):
            location = (Path(project_root).resolve() / "mlruns" / experiment).as_uri()
        experiment_id = client.create_experiment(
            experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )
    run = client.create_run(
        experiment_id, run_name=run_name, tags={**source_tags(project_root), **(tags or {})}
    )
    return RunRef(run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)


def mark_training_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as a model-training one unless it already has a kind (a kind chosen
    in the UI is kept)."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def log_params(ref: RunRef, params: Mapping[str, Any]) -> None:
    """Log flattened params; on a resumed run, values that changed (MLflow params are
    immutable) are recorded as ``resumed.<key>`` tags instead."""
    client = MlflowClient(ref.tracking_uri)
    existing = client.get_run(ref.run_id).data.params
    flat = flatten_params(params)
    new = [mlflow.entities.Param(k, v) for k, v in flat.items() if k not in existing]
    changed = [
        mlflow.entities.RunTag(f"resumed.{k}", v)
        for k, v in flat.items()
        if k in existing and existing[k] != v
    ]
    for start in range(0, len(new), 100):  # the store takes at most 100 params per batch
        client.log_batch(ref.run_id, params=new[start : start + 100])
    if changed:
        client.log_batch(ref.run_id, tags=changed)


def end_run(ref: RunRef, *, status: str) -> None:
    """Mark the run FINISHED / FAILED / KILLED from the driver."""
    MlflowClient(ref.tracking_uri).set_terminated(ref.run_id, status=status)


@contextmanager
def attached_run(ref: RunRef, *, system_metrics: bool = True) -> Iterator[MlflowClient]:
    """Attach this process (rank 0) to the run, sampling system metrics while inside.

    A worker that dies leaves the run RUNNING; the next attempt reattaches, and the driver
    sets the final status when training ends either way.
    """
    mlflow.set_tracking_uri(ref.tracking_uri)
    mlflow.start_run(run_id=ref.run_id, log_system_metrics=system_metrics)
    try:
        yield MlflowClient(ref.tracking_uri)
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def log_metrics(
    client: MlflowClient, ref: RunRef, metrics: Mapping[str, float], *, step: int
) -> None:
    """One batch write of several metrics at ``step``."""
    now = int(time.time() * 1000)
    entries = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
    client.log_batch(ref.run_id, metrics=entries)
