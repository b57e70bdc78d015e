"""The local Ray runtime that the stages start (pipeline.io.ray_runtime.ensure_ray): its job's
workers reach this cluster's state API, whatever else runs on the machine.

Ray Train's placement-group cleaner asks the state API whether the run's controller is alive,
and removes the run's placement group when told "no such actor". It finds the API server by
itself, so a cluster recorded elsewhere (a ``ray start`` in /tmp/ray, a dashboard on port
8265) would answer. Here the driver's environment points Ray's lookup at a port where nothing
listens, as a stand-in for "another cluster"; the workers must still ask their own.
"""

from __future__ import annotations

import pytest
import ray
from ray.train.v2._internal.state.util import is_actor_alive  # what the cleaner calls

from pipeline.io.network import free_port
from pipeline.io.ray_runtime import API_SERVER_ENV, ensure_ray


@ray.remote(num_cpus=0)
class Probe:
    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()

    def alive(self, actor_id: str) -> bool:
        return bool(is_actor_alive(actor_id=actor_id, timeout=30))


@pytest.fixture(scope="module")
def local_ray():
    with pytest.MonkeyPatch.context() as env:
        env.setenv(API_SERVER_ENV, f"http://127.0.0.1:{free_port()}")  # inherited by Ray
        env.delenv("RAY_ADDRESS", raising=False)
        ensure_ray(num_cpus=1)
        yield
        ray.shutdown()


def test_the_jobs_workers_ask_their_own_clusters_state_api(local_ray):
    target, asker = Probe.remote(), Probe.remote()
    assert ray.get(asker.alive.remote(ray.get(target.actor_id.remote())))
