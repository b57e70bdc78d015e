"""Suite-wide: no Ray runtime outlives the test module that started it.

A test that touches the object store without ``ray.init`` starts a runtime implicitly; a module
fixture that joins a runtime it did not start leaves it running. Either way the next module's
``ray.init`` would fail, so every module ends with Ray shut down. Ray is looked up, not imported:
tests/maskrcnn runs on machines without it (bench/gpu_check.sh).
"""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module", autouse=True)
def _no_ray_runtime_left_behind():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
