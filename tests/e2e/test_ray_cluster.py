"""The pipeline as a Ray job on a real two-node cluster, tracked by a real MLflow server.

On loopback: a head node and a worker node started with ``ray start`` (separate raylets, one
CPU each, token authentication on), an ``mlflow server`` with a SQLite backend and a proxied
artifact store, and ``ray job submit --working-dir <copy of the repo> -- dvc repro`` with
tiny params. The job's stages join the cluster through the RAY_ADDRESS that Ray sets for a job
driver; training runs two workers, STRICT_SPREAD, so one on each node; checkpoints go to a
``file://`` URI. Every process is stopped at the end, also when a test fails (``sandbox``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from repo_copy import copy_repo

from pipeline.training.loop import WORKER_NODES_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

BIN = Path(sys.executable).parent
STAGES = ["synthesize", "preprocess", "train", "evaluate", "register"]
RUN_NAME, MODEL_NAME = "cluster-e2e", "cluster-model"
STEPS, LOG_EVERY = 4, 2
START_TIMEOUT_S, JOB_TIMEOUT_S = 120, 600
OBJECT_STORE_BYTES = 200 * 1024**2
# What operators run: no .git travels with --working-dir, so DVC is told it has no SCM.
ENTRYPOINT = "dvc config --local core.no_scm true && dvc repro"
EXCLUDES = ["data/", "artifacts/", "ray_results/", "mlflow.db", "mlruns/", "mlartifacts/"]

TINY = {
    "shapes": {"n_train": 8, "n_val": 4, "seed": 3},
    "model": {
        "backbone": "resnet18",
        "canvas": 128,
        "fpn_channels": 32,
        "rpn": {"post_nms_top_n_train": 200, "post_nms_top_n_test": 100},
        "roi": {"batch_size_per_image": 64, "representation_size": 64, "mask_layers": [32]},
    },
    "train": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD",
              "batch_per_worker": 2, "steps": STEPS, "warmup_steps": 1, "checkpoint_every": 2,
              "log_every": LOG_EVERY, "run_name": RUN_NAME, "eval_every": 0, "select": "last"},
    "evaluate": {"num_overlays": 1},
    "register": {"model_name": MODEL_NAME, "min_segm_ap": 0.0, "onnx": False},
}  # fmt: skip


def free_port() -> int:
    """A TCP port that nothing listens on right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, *, timeout_s: float, alive: Callable[[], bool], what: str) -> None:
    """Poll ``url`` until it answers 200; fail early when ``alive()`` turns False."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            pytest.fail(f"{what} exited before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer on {url} in {timeout_s:.0f} s")


def wait_for_port(port: int, *, proc: subprocess.Popen, log: Path, what: str) -> None:
    """Wait until ``proc`` (still running, or finished well) accepts connections on ``port``."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() in (None, 0):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"{what}: nothing listens on port {port}:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def env(sandbox: Path) -> dict[str, str]:
    """The environment of every process the test starts: this venv first on PATH, a fresh
    cluster token (so no token in ~/.ray is needed or used), no cluster inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return {
        **env,
        "PATH": f"{BIN}:{env['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def start(command: list[str], *, cwd: Path, env: dict[str, str], log: str) -> subprocess.Popen:
    """A process in a session of its own, its output in ``cwd/log``."""
    with (cwd / log).open("w") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, *, log: Path, what: str) -> None:
    try:
        code = proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    assert code == 0, f"{what} failed ({code}):\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def servers(sandbox: Path, env: dict[str, str]) -> dict[str, str]:
    """A head and a worker node (each its own raylet with one CPU) and an MLflow server
    (SQLite backend, proxied artifact store), started side by side; returns their addresses."""
    gcs_port, dashboard_port, mlflow_port = free_port(), free_port(), free_port()
    (sandbox / "mlflow").mkdir()
    mlflow = start(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", "sqlite:///mlflow.db",
         "--artifacts-destination", "artifacts", "--host", "127.0.0.1",
         "--port", str(mlflow_port), "--workers", "1"],
        cwd=sandbox / "mlflow", env=env, log="server.log",
    )  # fmt: skip
    # RAY_ADDRESS for every Ray process: Ray's own helpers that look for "the" cluster on
    # this machine would otherwise find other clusters that tests beside this one started.
    ray_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    # Each node its own --temp-dir: a node unpacks the job's working dir under its temp dir,
    # and a second node on this machine would unpack over the head's copy, outputs and all.
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1",
              f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
              f"--dashboard-agent-listen-port={free_port()}"]  # fmt: skip
    head = start(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", *common,
         f"--temp-dir={sandbox / 'head'}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={free_port()}"],
        cwd=sandbox, env=ray_env, log="head.log",
    )  # fmt: skip
    wait_for_port(gcs_port, proc=head, log=sandbox / "head.log", what="ray start --head")
    common[-1] = f"--dashboard-agent-listen-port={free_port()}"
    worker = start(  # while the head starts its dashboard: the worker only needs the GCS
        [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs_port}", *common,
         f"--temp-dir={sandbox / 'node'}"],
        cwd=sandbox, env=ray_env, log="worker.log",
    )  # fmt: skip
    finish(head, log=sandbox / "head.log", what="ray start --head")
    finish(worker, log=sandbox / "worker.log", what="ray start --address")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    alive = [n for n in state(dashboard, "nodes", env) if n["state"] == "ALIVE"]
    assert len(alive) == 2, alive
    tracking = f"http://127.0.0.1:{mlflow_port}"
    wait_for_http(f"{tracking}/health", timeout_s=START_TIMEOUT_S, what="mlflow server",
                  alive=lambda: mlflow.poll() is None)  # fmt: skip
    return {"dashboard": dashboard, "tracking": tracking}


def state(dashboard: str, kind: str, env: dict[str, str], **filters: str) -> list[dict]:
    """Ray's state API over HTTP (what `ray list` uses), with the cluster token."""
    query = [("limit", "1000"), ("detail", "true")]
    for key, value in filters.items():
        query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    request = urllib.request.Request(
        f"{dashboard}/api/v0/{kind}?{urllib.parse.urlencode(query)}",
        headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]["result"]["result"]


@pytest.fixture(scope="module")
def project(sandbox: Path, servers: dict[str, str]) -> Path:
    """The repository's tracked and unignored files (no .git), with tiny cluster params."""
    storage = (sandbox / "shared" / "ray_results").as_uri()
    overrides = {**TINY, "train": {**TINY["train"], "storage_path": storage},
                 "tracking": {"uri": servers["tracking"]}}  # fmt: skip
    return copy_repo(sandbox / "repo", overrides)


@pytest.fixture(scope="module")
def job(servers: dict[str, str], project: Path, env: dict[str, str], sandbox: Path) -> str:
    """Submit the pipeline as a Ray job and wait for it; returns its log."""
    job_id = f"e2e-{secrets.token_hex(4)}"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", servers["dashboard"],
        "--submission-id", job_id, "--working-dir", str(project),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "bash", "-c", ENTRYPOINT,
    ]  # fmt: skip
    try:
        proc = subprocess.run(command, cwd=sandbox, env=env, capture_output=True, text=True,
                              timeout=JOB_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as timeout:
        log = timeout.stdout or b""  # bytes, even with text=True
        log = log.decode(errors="replace") if isinstance(log, bytes) else log
        pytest.fail(f"job {job_id} ran over {JOB_TIMEOUT_S} s:\n{log[-8000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"job {job_id} failed:\n{output[-8000:]}"
    return output


def test_job_runs_every_stage_and_each_joins_the_cluster(job: str):
    assert re.findall(r"Running stage '(\w+)'", job) == STAGES
    joined = re.findall(r"joining Ray cluster at (\S+)", job)  # from RAY_ADDRESS, set by Ray
    assert len(joined) == 3 and len(set(joined)) == 1, joined  # preprocess, train, evaluate
    assert "starting a local Ray runtime" not in job


def the_run(servers: dict[str, str]) -> Run:
    client = MlflowClient(tracking_uri=servers["tracking"])
    experiment = client.get_experiment_by_name("maskrcnn")
    runs = client.search_runs([experiment.experiment_id], f"run_name = '{RUN_NAME}'")
    assert len(runs) == 1
    return runs[0]


def test_training_ran_one_worker_on_each_node(job: str, servers: dict[str, str], env):
    nodes = {n["node_id"] for n in state(servers["dashboard"], "nodes", env)}
    workers = state(servers["dashboard"], "actors", env, class_name="RayTrainWorker")
    assert len(workers) == 2, workers  # one worker group, never restarted
    assert {w["node_id"] for w in workers} == nodes  # both nodes, one worker each
    tagged = the_run(servers).data.tags[WORKER_NODES_TAG].split(",")  # rank 0, rank 1
    assert sorted(tagged) == sorted(nodes)


def test_checkpoints_went_to_the_storage_uri(job: str, sandbox: Path):
    run_dirs = list((sandbox / "shared" / "ray_results").glob(f"{RUN_NAME}-*"))
    assert len(run_dirs) == 1, run_dirs  # <run_name>-<recipe hash>
    checkpoints = sorted(p.name for p in run_dirs[0].glob("checkpoint_*") if p.is_dir())
    assert checkpoints[-1] == f"checkpoint_{STEPS:08d}", checkpoints


def test_run_metrics_and_model_are_in_the_server(job: str, servers: dict[str, str]):
    client = MlflowClient(tracking_uri=servers["tracking"])
    run = the_run(servers)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_mask")]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert 0.0 <= run.data.metrics["eval/segm_AP"] <= 1.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    assert "train/loss.csv" in logged  # through the server's artifact proxy
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == run.info.run_id
