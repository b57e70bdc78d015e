"""How many CPUs a training worker reserves: ``cpus_per_worker: null`` shares one machine's
CPUs out (one left to Ray Data's reads when the split streams), a cluster gets one per worker,
and an explicit reservation that would starve the reads is refused before Ray hangs on it."""

import pytest

from pipeline.config.errors import UserError
from pipeline.config.settings import TrainSettings
from pipeline.training.resources import torch_threads, with_worker_cpus


def cpus(*, workers=1, cpus=None, ray_cpus=2.0, nodes=1, streamed=False) -> float:
    settings = TrainSettings(num_workers=workers, cpus_per_worker=cpus)
    resolved = with_worker_cpus(settings, ray_cpus=ray_cpus, nodes=nodes, streamed=streamed)
    return resolved.cpus_per_worker


def test_null_gives_one_worker_every_core_of_a_local_ray():
    assert cpus(workers=1, ray_cpus=2.0) == 2.0
    assert cpus(workers=2, ray_cpus=2.0) == 1.0
    assert cpus(workers=3, ray_cpus=16.0) == pytest.approx(5.333)


def test_null_leaves_one_cpu_to_the_reads_of_a_streamed_split():
    assert cpus(workers=1, ray_cpus=2.0, streamed=True) == 1.0
    assert cpus(workers=2, ray_cpus=16.0, streamed=True) == 7.5
    assert cpus(workers=2, ray_cpus=1.0, streamed=True) == 0.5  # never below one CPU in all


def test_null_is_one_cpu_per_worker_on_a_cluster():
    assert cpus(workers=4, ray_cpus=64.0, nodes=2) == 1.0


def test_an_explicit_reservation_is_kept_where_reads_can_run():
    assert cpus(cpus=2.0, ray_cpus=2.0) == 2.0  # a cached split needs no read tasks
    assert cpus(cpus=1.0, ray_cpus=2.0, streamed=True) == 1.0
    assert cpus(cpus=8.0, ray_cpus=8.0, nodes=2, streamed=True) == 8.0  # other nodes may read


def test_a_reservation_of_every_cpu_with_a_streamed_split_is_refused():
    with pytest.raises(UserError, match=r"cpus_per_worker 1 x num_workers 2 reserves all 2 CPUs"):
        cpus(workers=2, cpus=1.0, ray_cpus=2.0, streamed=True)


def test_a_cpu_worker_runs_one_torch_thread_per_whole_cpu():
    assert torch_threads(TrainSettings(cpus_per_worker=2.0)) == 2
    assert torch_threads(TrainSettings(cpus_per_worker=0.5)) == 1
    assert torch_threads(TrainSettings(cpus_per_worker=None)) == 1
