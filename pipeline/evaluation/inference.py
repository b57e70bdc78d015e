"""Where the evaluate stage's inference runs: on this machine, or on a Ray Data actor pool.

On one machine without a cluster to spread over, an actor pool only adds its fixed costs (a
Ray runtime, actor processes that import torch and load the model, Ray Data's read tasks)
to a val set that the machine's cores or its one GPU score as fast here: there
``concurrency: auto`` runs on this machine. On CPUs that means one process per core with one
torch thread each, forked from this one once the model is built (no start-up to speak of):
detection is many small operators and Python between them, which one thread per core keeps
busier than one process with a thread per core (docs/benchmarks.md, "Evaluation in forked
processes"). On a GPU, or where processes are not forked (not Linux), it is this process. On
a cluster (``ray.address`` or ``RAY_ADDRESS``), or with
several GPUs, the actors each build the model once (a GPU each when the cluster has them) and
turn batches of shard rows into COCO results; the model file's bytes reach them through Ray's
object store, so they need not see the driver's files.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from maskrcnn.checkpoints import load_model
from pipeline.config.errors import UserError
from pipeline.config.settings import AUTO, LOCAL
from pipeline.inference.detector import Detector
from pipeline.inference.shard_scoring import ROW_COLUMNS, batched, detect_rows, iter_rows
from pipeline.io import storage
from pipeline.io.console import ImageProgress
from pipeline.shards.schema import shard_files

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# concurrency "auto" on CPUs: one actor per this many CPUs of the cluster (docs/benchmarks.md,
# "Evaluation actors on CPU": on 2 cores, 2 one-thread actors vs 1 two-thread actor).
CPUS_PER_AUTO_ACTOR = 2

Images = list[tuple[int, str]]  # (image_id, file_name) in image-id order
Results = list[dict[str, Any]]  # COCO results of every image


@dataclass(frozen=True)
class PoolPlan:
    """The inference actor pool: how many actors, what each reserves, and its torch threads."""

    size: int
    num_cpus: float
    num_gpus: int
    threads: int


class ShardPredictor:
    """Builds the model once, then shard rows -> COCO results (JSON per image): a Ray Data
    actor, or the whole of inference in this process.

    ``model`` is the model file's bytes (in Ray's object store for an actor: fetched on
    whichever node it runs), never a path: the driver's files are not the actor's. On a GPU the
    model runs under autocast in ``amp`` ("none", "bf16", "fp16": the training's).
    """

    def __init__(
        self,
        *,
        model: ray.ObjectRef | bytes,
        categories: list[dict],
        score_threshold: float,
        threads: int,
        amp: str = "none",
    ) -> None:
        # ``threads``: the actor's share of the cluster's cores, at most its node's.
        torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        raw = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.detector = Detector(load_model(io.BytesIO(raw)), categories=categories, device=device)
        self.score_threshold = score_threshold
        self.amp = AMP_DTYPES.get(amp) if device == "cuda" else None

    def detect(self, rows: list[dict[str, Any]]) -> list[Results]:
        """Each row's COCO results."""
        autocast = torch.autocast("cuda", dtype=self.amp) if self.amp else contextlib.nullcontext()
        with autocast:
            return detect_rows(self.detector, rows, score_threshold=self.score_threshold)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image_id"])
        rows = [{name: column[i] for name, column in batch.items()} for i in range(count)]
        results = [json.dumps(r) for r in self.detect(rows)]
        return {
            "image_id": batch["image_id"],
            "file_name": batch["file_name"],
            "results": np.array(results, dtype=object),
        }


def runs_here(concurrency: int | str, ray_address: str | None) -> bool:
    """Whether ``concurrency`` means this process: "local", or "auto" with no cluster to spread
    over (no address, and at most one GPU here)."""
    if concurrency == LOCAL:
        return True
    clustered = ray_address or os.environ.get("RAY_ADDRESS")
    return concurrency == "auto" and not clustered and torch.cuda.device_count() <= 1


def predict_here(
    *,
    model_bytes: bytes,
    shards_dir: storage.Location,
    manifest: Mapping[str, Any],
    batch_size: int,
    score_threshold: float,
    amp: str = "none",
    processes: int | str = AUTO,
) -> tuple[Images, Results]:
    """Inference on this machine, one batch at a time: on the GPU in this process, on CPUs in
    ``processes`` forked ones ("auto": one per core, ``local_processes``)."""
    predictor = ShardPredictor(
        model=model_bytes,
        categories=manifest["categories"],
        score_threshold=score_threshold,
        threads=len(os.sched_getaffinity(0)),
        amp=amp,
    )
    count = local_processes(processes, predictor.detector.device)
    if count > 1:
        log.info("inference in %d forked processes, 1 torch thread each, on CPU", count)
    else:
        log.info(
            "inference in this process: %d torch thread(s) on %s",
            torch.get_num_threads(),
            predictor.detector.device,
        )
    per_image: list[tuple[int, str, Results]] = []
    batches = batched(iter_rows(shards_dir, manifest), batch_size)
    with (
        ImageProgress(f"evaluate {_split(shards_dir)}", total=_count(manifest)) as meter,
        local_detections(predictor, count) as detect,
    ):
        for rows, detected in detect(batches):
            for row, results in zip(rows, detected, strict=True):
                per_image.append((int(row["image_id"]), str(row["file_name"]), results))
            meter.add(len(rows))
    return _in_id_order(per_image)


def local_processes(processes: int | str, device: torch.device) -> int:
    """How many processes infer on this machine: ``processes``, or for "auto" one per core on
    CPUs where processes can be forked (Linux), else 1. Only CPU inference forks: a CUDA
    context does not survive a fork."""
    forks = sys.platform.startswith("linux")
    if processes == AUTO:
        return len(os.sched_getaffinity(0)) if device.type == "cpu" and forks else 1
    if int(processes) > 1 and (device.type != "cpu" or not forks):
        log.warning(
            "evaluate.processes %s ignored: inference on %s%s runs in this process",
            processes,
            device,
            "" if forks else f" ({sys.platform} does not fork)",
        )
        return 1
    return int(processes)


# The forked workers' predictor: inherited from the parent's memory at the fork, not pickled.
_FORKED: ShardPredictor | None = None


def _adopt(predictor: ShardPredictor) -> None:
    global _FORKED
    torch.set_num_threads(1)
    _FORKED = predictor


def _detect_forked(rows: list[dict[str, Any]]) -> list[Results]:
    assert _FORKED is not None, "called outside a forked inference worker"
    return _FORKED.detect(rows)


@contextlib.contextmanager
def local_detections(predictor: ShardPredictor, processes: int):
    """``detect(batches)`` -> (rows, their results) per batch, in order: in this process, or
    spread over ``processes`` forked workers with a few batches in flight per worker."""
    if processes == 1:
        yield lambda batches: ((rows, predictor.detect(rows)) for rows in batches)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_adopt, initargs=(predictor,)
    ) as pool:
        # The first task forks every worker: before the shards are read, so that no thread of
        # this process is busy (pyarrow's readers) at the fork.
        pool.submit(int).result()

        def detect(batches: Iterable[list[dict[str, Any]]]) -> Iterator[tuple[list, list]]:
            in_flight: collections.deque = collections.deque()
            try:
                for rows in batches:
                    in_flight.append((rows, pool.submit(_detect_forked, rows)))
                    if len(in_flight) > 2 * processes:
                        rows, done = in_flight.popleft()
                        yield rows, done.result()
                for rows, done in in_flight:
                    yield rows, done.result()
            except BrokenProcessPool as error:
                raise UserError(
                    f"an inference process of the {processes} stopped abruptly (killed, out of "
                    "memory?): set evaluate.processes lower, or to 1 for inference in the "
                    "stage's own process"
                ) from error

        yield detect


def predict_on_actors(
    *,
    model: ray.ObjectRef,
    shards_dir: storage.Location,
    manifest: Mapping[str, Any],
    batch_size: int,
    score_threshold: float,
    plan: PoolPlan,
    amp: str = "none",
) -> tuple[Images, Results]:
    """Inference on a Ray Data actor pool of ``plan``'s size."""
    filesystem, paths = shard_files(shards_dir, manifest=manifest)
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, columns=ROW_COLUMNS)
    dataset.context.enable_progress_bars = False  # ours instead (ImageProgress): one bar, or lines
    log.info(
        "inference on %d actor(s), each %g CPU, %d GPU, %d torch thread(s), amp %s",
        plan.size,
        plan.num_cpus,
        plan.num_gpus,
        plan.threads,
        amp if plan.num_gpus else "none (CPU)",
    )
    predicted = dataset.map_batches(
        ShardPredictor,
        fn_constructor_kwargs={
            "model": model,
            "categories": manifest["categories"],
            "score_threshold": score_threshold,
            "threads": plan.threads,
            "amp": amp,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        udf_modifying_row_count=False,
    )
    per_image: list[tuple[int, str, Results]] = []
    with ImageProgress(f"evaluate {_split(shards_dir)}", total=_count(manifest)) as meter:
        for row in predicted.iter_rows():
            per_image.append(
                (int(row["image_id"]), str(row["file_name"]), json.loads(row["results"]))
            )
            meter.add(1)
    return _in_id_order(per_image)


def pool_plan(concurrency: int | str, resources: Mapping[str, float]) -> PoolPlan:
    """The actor pool for ``concurrency`` (an int, or "auto") on a cluster with ``resources``.

    With GPUs: one actor per GPU ("auto", and the most allowed). On CPUs the actors share all
    but one of the cluster's CPUs (Ray Data's read tasks need one: actors holding every CPU
    would wait for data forever), each computing with its share of the cores; "auto" is one
    actor per ``CPUS_PER_AUTO_ACTOR`` CPUs.
    """
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    limit = gpus if gpus else cpus
    wanted = (gpus or max(1, cpus // CPUS_PER_AUTO_ACTOR)) if concurrency == "auto" else concurrency
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ValueError(
            "evaluate.concurrency must be a positive integer, "
            f'"auto" or "local", got {concurrency!r}'
        )
    size = min(wanted, limit)
    if size < wanted:
        log.warning(
            "evaluate.concurrency %d lowered to %d to fit the cluster (%s)",
            wanted,
            size,
            "one actor per GPU" if gpus else "one per CPU",
        )
    if gpus:
        return PoolPlan(size=size, num_cpus=1, num_gpus=1, threads=max(1, cpus // size))
    share = min(1.0, max(cpus - 1, 1) / size)
    return PoolPlan(size=size, num_cpus=share, num_gpus=0, threads=max(1, cpus // size))


def _in_id_order(per_image: list[tuple[int, str, Results]]) -> tuple[Images, Results]:
    per_image.sort(key=lambda item: item[0])
    results = [r for _, _, image_results in per_image for r in image_results]
    return [(image_id, file_name) for image_id, file_name, _ in per_image], results


def _split(shards_dir: storage.Location) -> str:
    return str(shards_dir).rstrip("/").rsplit("/", 1)[-1]


def _count(manifest: Mapping[str, Any]) -> int:
    return int(manifest["counts"]["images"])
