"""How many Ray Data tasks run at once with and without per-operator resource reservation.

The dataset is built as ``pipeline.shards.preprocess`` builds its own: ``from_items`` with one
block per item, one ``map_batches`` operator of one-CPU tasks, ``batch_size=1``, order kept. Each
task sleeps ``--task-s`` and returns its start and end times, so the figure is about scheduling
only and does not depend on what else keeps the machine's cores busy. Concurrency = the sum of
the tasks' durations / the time from the first start to the last end (``num_cpus`` at best).
The two settings alternate for ``--repeats`` rounds on one local Ray. Prints JSON.

    .venv/bin/python bench/ray_reservation.py --cpus 2 --tasks 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow as pa
import ray
from common import load_average, start_local_ray


def sleepy_task(batch: pa.Table, *, seconds: float) -> pa.Table:
    start = time.time()
    time.sleep(seconds)
    return pa.table({"start": [start], "end": [time.time()]})


def one_pass(*, tasks: int, seconds: float, reservation: bool) -> dict[str, float]:
    source = ray.data.from_items([{"i": i} for i in range(tasks)], override_num_blocks=tasks)
    context = source.context
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.op_resource_reservation_enabled = reservation
    mapped = source.map_batches(
        sleepy_task,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={"seconds": seconds},
    )
    wall = time.perf_counter()
    rows = mapped.take_all()
    wall = time.perf_counter() - wall
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    busy = sum(r["end"] - r["start"] for r in rows)
    return {"tasks_at_a_time": round(busy / span, 2), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--task-s", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    load_at_start = load_average()
    start_local_ray(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        one_pass(tasks=args.cpus, seconds=0.01, reservation=False)  # workers start, imports
        runs: dict[str, list] = {"reservation_on": [], "reservation_off": []}
        for r in range(args.repeats):
            for name in ("reservation_on", "reservation_off")[:: 1 if r % 2 == 0 else -1]:
                reservation = name == "reservation_on"
                runs[name].append(
                    one_pass(tasks=args.tasks, seconds=args.task_s, reservation=reservation)
                )
    finally:
        ray.shutdown()
    result = {
        "cpus": args.cpus,
        "tasks": args.tasks,
        "task_s": args.task_s,
        "ray": ray.__version__,
        **runs,
        "load_average": {"start": load_at_start, "end": load_average()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
