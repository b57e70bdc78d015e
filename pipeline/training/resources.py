"""How many of Ray's CPUs each training worker reserves (``train.cpus_per_worker``).

On one machine the fastest layout is one worker that trains with every core: a second worker
halves each step's batch but adds a gradient all-reduce that gloo does not hide on CPU
(docs/benchmarks.md). ``cpus_per_worker: null`` therefore shares a one-node Ray's CPUs evenly
among the workers, and a worker's torch threads follow its share. The share leaves one CPU to
Ray Data when the train split streams from its files (larger than the object-store cache): its
read tasks run outside the workers' reservation and would otherwise wait forever. On a
cluster the node sizes differ, so null means one CPU per worker; set it there.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.config.errors import UserError
from pipeline.config.settings import TrainSettings


def with_worker_cpus(
    settings: TrainSettings, *, ray_cpus: float, nodes: int, streamed: bool
) -> TrainSettings:
    """``settings`` with ``cpus_per_worker`` resolved (None: the share above), checked against
    a one-node Ray of ``ray_cpus`` CPUs whose train split is ``streamed`` or cached."""
    reads = 1.0 if streamed else 0.0
    cpus = settings.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if nodes > 1 else max(ray_cpus - reads, 1.0) / settings.num_workers
    elif nodes == 1 and streamed and cpus * settings.num_workers > ray_cpus - reads:
        raise UserError(
            f"train.cpus_per_worker {cpus:g} x num_workers {settings.num_workers} reserves all "
            f"{ray_cpus:g} CPUs of this Ray, but the train split streams from its files and "
            "Ray Data's read tasks need one outside the workers: training would wait forever. "
            "Lower cpus_per_worker, or set it to null (the CPUs shared out, one left for reads)"
        )
    return replace(settings, cpus_per_worker=round(cpus, 3))


def torch_threads(settings: TrainSettings) -> int:
    """A CPU worker's torch threads: its whole reserved CPUs, at least one."""
    return max(1, int(settings.cpus_per_worker or 1))
