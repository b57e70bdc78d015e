"""Why the test suite's processes wait passively: the same training step in one process alone,
then in two processes at once, under libgomp's default wait policy and under
``OMP_WAIT_POLICY=PASSIVE``, in rounds.

``make test`` runs two pytest processes on two cores, and each one's Ray workers, DVC stages and
model steps use torch threads = cores. With libgomp's default policy an idle OpenMP thread
spins before it sleeps, so two such processes burn each other's cores between operators;
passive threads sleep at once, which costs a process that is alone a little. JSON on stdout.

    .venv/bin/python bench/omp_processes.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import load_average
from omp_threads import ROOT, train_steps, training_setup

POLICIES = {"default": None, "passive": "PASSIVE"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each process")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps per process and run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def child(args: argparse.Namespace) -> None:
    """Build the model, signal ready on stdout, wait for the go line, time the steps."""
    model, images, targets = training_setup(args.params, threads=args.threads, batch=args.batch)
    train_steps(model, images, targets, 2)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    train_steps(model, images, targets, args.steps)
    print(json.dumps({"ms_per_step": round((time.perf_counter() - start) / args.steps * 1e3, 1)}))


def run(args: argparse.Namespace, *, processes: int, policy: str | None) -> list[float]:
    """ms per step of each of ``processes`` children, started together once all are built."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child", "--threads", str(args.threads),
               "--batch", str(args.batch), "--steps", str(args.steps),
               "--params", str(args.params)]  # fmt: skip
    procs = [subprocess.Popen(command, env=env, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) for _ in range(processes)]  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", "a child failed to start"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    times = [json.loads(proc.communicate()[0].strip().splitlines()[-1])["ms_per_step"]
             for proc in procs]  # fmt: skip
    if any(proc.returncode for proc in procs):
        raise RuntimeError("a child exited with an error")
    return times


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    report = {"load_average": {"start": load_average()}, "threads": args.threads, "runs": {}}
    for _ in range(args.rounds):
        for name, policy in POLICIES.items():
            for processes in (1, 2):
                key = f"{name}_{processes}_process{'es' if processes > 1 else ''}"
                report["runs"].setdefault(key, []).extend(
                    run(args, processes=processes, policy=policy)
                )
    median = {k: statistics.median(v) for k, v in report["runs"].items()}
    report["median_ms_per_step"] = median
    report["two_processes_default_over_passive"] = round(
        median["default_2_processes"] / median["passive_2_processes"], 3
    )
    report["alone_passive_over_default"] = round(
        median["passive_1_process"] / median["default_1_process"], 3
    )
    report["load_average"]["end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
