"""Helpers shared by the bench scripts, which run as ``python bench/<name>.py`` (so this
directory is on ``sys.path`` and ``from common import ...`` resolves here)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import ray

# Freed tensors leave the process at once with this glibc threshold, so that a peak RSS follows
# the live tensors instead of the allocator's caching.
FRESH_PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def add_shapes_args(parser: argparse.ArgumentParser, *, images: int, canvas: int = 512) -> None:
    """The synthetic shapes dataset's size flags: image count, canvas and image side range."""
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--canvas", type=int, default=canvas)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=512)


def run_json_child(
    command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> dict:
    """Run ``command`` to completion and parse the JSON on the last line of its stdout."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{command[1:3]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_fresh_child(command: list[str], env: dict[str, str] | None = None) -> dict:
    """``run_json_child`` with ``FRESH_PROCESS_ENV``: for children that report ``peak_rss_mb``."""
    return run_json_child(command, env={**(env or os.environ), **FRESH_PROCESS_ENV})


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``), in MB.

    Not ``getrusage(...).ru_maxrss``: on Linux a process started by fork + exec keeps the
    maximum of the process it was forked from, so a child of a large parent reports the
    parent's peak. ``VmHWM`` starts again at exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages: how busy the machine was (2 cores: 2.0 = full)."""
    return [round(x, 2) for x in os.getloadavg()]


def start_local_ray(*, attempts: int = 3, **init_kwargs) -> None:
    """``ray.init(address="local", ...)``, tried again when the node does not come up in time.

    Ray gives a new node 30 s to register; on a machine loaded far beyond its cores that is
    not always enough, and a benchmark should wait for its Ray rather than fail.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **init_kwargs)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(error) or attempt == attempts:
                raise
            ray.shutdown()
            time.sleep(5)


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``repeats`` calls of ``fn``, after one warm-up call (oneDNN primitives,
    caches, lazy compilation)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def in_turn(calls: dict[str, Callable[[], object]], *, rounds: int, repeats: int) -> dict:
    """Each call's seconds per call, the calls in turn within every round, and their medians."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(round(seconds_per_call(fn, repeats), 4))
    return {
        "seconds_per_call": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
    }
