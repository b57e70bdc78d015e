"""The node-loss drill: a worker node's raylet killed mid-training, on a simulated 2-node cluster
(real Ray, a real MLflow server: a cluster wants one), through the train stage's own ``train``.

Two workers, one per node (``STRICT_SPREAD``). Once the checkpoint of step 4 is being written
(so that of step 2 is registered: the loop waits for that before it goes on), the worker node
goes (its raylet and workers killed, no drain). Ray Train restarts the worker
group, which cannot be placed on the one node left: each start times out
(``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, shortened here), and after ``train.max_failures``
more the run stops with one clear error. A node added back and a rerun with the same run name
resume from the last checkpoint and finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from test_fault_drills import checkpoints, make_project, served_mlflow, settings
from test_ray_cluster import free_port

from pipeline.config.errors import UserError
from pipeline.config.settings import TrackingSettings
from pipeline.training.trainer import TrainResult, train

pytestmark = pytest.mark.e2e

STEPS = 12
START_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 1-CPU head and, added by ``nodes``, 1-CPU worker nodes (the job's environment: see
    test_fault_drills.own_cluster; and Ray Train's start timeout)."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "dashboard_port": free_port()},
    )
    env = {"RAY_ADDRESS": cluster.address,
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)}  # fmt: skip
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def project(cluster, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("node-loss"))


@pytest.fixture(scope="module")
def mlflow_server(sandbox: Path) -> Iterator[str]:
    with served_mlflow(sandbox) as url:
        yield url


def run(project, tracking: str, storage: Path, out: Path) -> TrainResult:
    root, shards, config = project
    return train(
        settings=settings(
            steps=STEPS,
            placement_strategy="STRICT_SPREAD",
            storage_path=str(storage),
            run_name="node-loss",
        ),
        model_config=config,
        shards_dir=shards,
        tracking=TrackingSettings(uri=tracking, experiment="node-loss"),
        out_dir=out,
        project_root=root,
    )


def remove_when_checkpointed(cluster: Cluster, node, storage: Path, step: int) -> threading.Thread:
    """A thread that kills ``node`` (no drain) once the checkpoint of ``step`` is being written."""
    name = f"checkpoint_{step:08d}"

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if any((d / name).exists() for d in storage.glob("node-loss-*")):
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_lost_node_stops_the_run_clearly_and_a_rerun_resumes(
    cluster, project, mlflow_server, tmp_path
):
    storage = tmp_path / "ray_results"
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    watcher = remove_when_checkpointed(cluster, node, storage, step=4)
    with pytest.raises(UserError) as stopped:
        run(project, mlflow_server, storage, tmp_path / "out")
    watcher.join(timeout=5)
    assert not watcher.is_alive(), "the node was never removed"
    message = str(stopped.value)
    assert "could not start the 2 training workers" in message, message
    assert "rerun with the same run name" in message, message
    assert "checkpoint_00000002" in checkpoints(storage, "node-loss")

    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    result = run(project, mlflow_server, storage, tmp_path / "out")
    assert result.resumed_from >= 2  # the last checkpoint registered before the node went
    assert result.metrics["step"] == STEPS
    assert [row["step"] for row in result.history] == list(range(1, STEPS + 1))
