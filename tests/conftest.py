"""Suite-wide: no Ray runtime outlives the test module that started it.

A test that touches the object store without ``ray.init`` starts a runtime implicitly; a module
fixture that joins a runtime it did not start leaves it running. Either way the next module's
``ray.init`` would fail, so every module ends with Ray shut down. Ray is looked up, not imported:
tests/maskrcnn runs on machines without it (bench/gpu_check.sh).

Under pytest-xdist (``make test`` runs two processes) each process gets its own Ray temp dir:
``ray.init()`` joins the cluster named in ``<temp dir>/ray/ray_current_cluster``, which would
otherwise be the other process's. And their OpenMP threads sleep when idle instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``, inherited by Ray's and DVC's processes): two processes that each
spin-wait on both cores slow each other down 2-3x, more than passive waiting costs one alone.

Ray Train's controller polls its workers every 2 s by default, so each of the suite's few-step
runs waited up to 2 s at every state change (workers up, training done, a worker died). Tests
poll every 0.5 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, read by the controller, which Ray's
processes started from here inherit).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}"
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp


@pytest.fixture(scope="module", autouse=True)
def _no_ray_runtime_left_behind():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
