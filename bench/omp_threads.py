"""Why the training thread collates its own batches on CPU: one training step timed in the
process's main thread and in a second thread, in turn, each after the other has run.

Ray Train runs the training function in a thread of its own, beside Ray Data's collate
threads. Every thread that runs torch's multi-threaded operators keeps an OpenMP team, and
once a process holds more OpenMP threads than cores, libgomp cuts the spin-wait of every
team's threads (GOMP_SPINCOUNT's throttled value): they sleep between operators and each
operator pays their wake-up. Here the second thread's step runs while the main thread's team
exists (it built the model), as the step would beside a collate thread. ``--passive`` sets
``OMP_WAIT_POLICY=PASSIVE`` in a child run: the main thread then slows down as much, which
says the spin-wait is the difference. JSON on stdout.

    .venv/bin/python bench/omp_threads.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from common import load_average, run_json_child
from model_step import synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskrcnn import MaskRCNN  # noqa: E402
from pipeline.config.params import load_params, model_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round and thread")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--passive", action="store_true", help="also a child with PASSIVE waits")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def training_setup(params: Path, *, threads: int, batch: int) -> tuple[MaskRCNN, list, list]:
    """params.yaml's model (channels_last, training mode) and a synthetic batch, at ``threads``
    torch threads: what each step of these OpenMP probes runs."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = model_config(load_params(params), num_classes=6)
    model = MaskRCNN(config).to(memory_format=torch.channels_last).train()
    return model, *synthetic_batch(config, batch, instances=6)


def train_steps(model: MaskRCNN, images: list, targets: list, steps: int) -> None:
    """``steps`` forward + backward passes (no optimizer: the probes time torch's operators)."""
    for _ in range(steps):
        sum(model(images, targets).values()).backward()
        model.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace) -> dict:
    model, images, targets = training_setup(args.params, threads=args.threads, batch=args.batch)

    def steps(out: list) -> None:
        torch.set_num_threads(args.threads)
        for warm in (True, False):
            start, cpu = time.perf_counter(), cpu_seconds()
            train_steps(model, images, targets, 2 if warm else args.steps)
            wall = time.perf_counter() - start
        out.append({"ms_per_step": round(wall / args.steps * 1000, 1),
                    "cpu_percent": round((cpu_seconds() - cpu) / wall * 100)})  # fmt: skip

    runs: dict[str, list] = {"main": [], "thread": []}
    for _ in range(args.rounds):
        steps(runs["main"])
        worker = threading.Thread(target=steps, args=(runs["thread"],))
        worker.start()
        worker.join()
    median = {k: statistics.median(r["ms_per_step"] for r in v) for k, v in runs.items()}
    return {
        "runs": runs,
        "median_ms_per_step": median,
        "thread_over_main": round(median["thread"] / median["main"], 3),
    }


def main() -> None:
    args = parse_args()
    report = {"load_average": {"start": load_average()}, "threads": args.threads}
    report["default_wait_policy"] = measure(args)
    if args.child:
        print(json.dumps(report["default_wait_policy"]))
        return
    if args.passive:
        command = [sys.executable, __file__, "--child", "--rounds", str(args.rounds),
                   "--steps", str(args.steps), "--batch", str(args.batch),
                   "--threads", str(args.threads), "--params", str(args.params)]  # fmt: skip
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        report["passive_wait_policy"] = run_json_child(command, env=env)
    report["load_average"]["end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
