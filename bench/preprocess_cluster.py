"""Preprocess throughput on a local 2-node Ray cluster vs a 1-node Ray, one CPU per node.

Both setups are ``ray.cluster_utils.Cluster``: a GCS and one raylet process per node, as
``ray start`` would give, on this machine. The driver joins the cluster and runs
``preprocess_split`` on the same synthetic dataset; its Ray tasks (one CPU each) spread over
the nodes, and the shards land in a directory that every node sees (here: the same disk).

Each setup runs in a fresh process: one warm-up pass (worker start-up and imports), then the
faster of two timed passes. Reported: images/s, the speed-up, the CPU seconds each node's
raylet and workers used in the timed pass (proof that both nodes worked) and those of the
driver (which writes the shards, and bounds the speed-up), and the 1-minute load average,
since on a shared machine other work takes cores. Prints JSON.

    .venv/bin/python bench/preprocess_cluster.py --images 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_shapes_args, run_json_child  # noqa: E402

from maskrcnn.config import ModelConfig  # noqa: E402
from pipeline.coco.shapes import write_shapes_dataset  # noqa: E402

SETUPS = {"1_node_1_cpu": 1, "2_nodes_1_cpu_each": 2}
OBJECT_STORE_BYTES = 200 * 1024**2


def node_cpu_seconds() -> list[float]:
    """CPU seconds so far of each raylet under this process, with all its workers."""
    totals = []
    for raylet in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if raylet.name() != "raylet":
                continue
            total = 0.0
            for process in [raylet, *raylet.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
            totals.append(total)
    return totals


def timed_pass(preprocess_split, run: dict, out_dir: Path, images: int) -> dict:
    driver = psutil.Process()
    before, driver_before = node_cpu_seconds(), sum(driver.cpu_times()[:2])
    start = time.perf_counter()
    preprocess_split(**run, out_dir=out_dir)
    seconds = time.perf_counter() - start
    used = [after - b for after, b in zip(node_cpu_seconds(), before, strict=True)]
    return {
        "images_per_s": images / seconds,
        "node_cpu_s": sorted((round(u, 1) for u in used), reverse=True),
        "driver_cpu_s": round(sum(driver.cpu_times()[:2]) - driver_before, 1),
        "load_average_1min": os.getloadavg()[0],
    }


def child(args: argparse.Namespace) -> dict:
    """One setup in this process: a cluster of ``args.nodes`` one-CPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.shards.preprocess import preprocess_split

    node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            write_shapes_dataset(
                data, n_train=args.images, n_val=1, seed=0,
                min_side=args.min_side, max_side=args.max_side,
            )  # fmt: skip
            run = {
                "annotation_file": data / "annotations" / "instances_train.json",
                "images_dir": data / "images" / "train",
                "model_config": ModelConfig(num_classes=6, canvas=args.canvas),
                "rows_per_shard": args.rows_per_shard,
                "progress": False,
            }
            preprocess_split(**run, out_dir=Path(tmp) / "warm")
            passes = [
                timed_pass(preprocess_split, run, Path(tmp) / f"pass{i}", args.images)
                for i in range(2)
            ]
        return max(passes, key=lambda p: p["images_per_s"])
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_child(args: argparse.Namespace, nodes: int) -> dict:
    flags = {
        "--images": args.images, "--canvas": args.canvas, "--min-side": args.min_side,
        "--max-side": args.max_side, "--rows-per-shard": args.rows_per_shard, "--nodes": nodes,
    }  # fmt: skip
    command = [sys.executable, __file__, "--child", *(str(v) for kv in flags.items() for v in kv)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return run_json_child(command, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shapes_args(parser, images=200)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = {name: run_child(args, nodes) for name, nodes in SETUPS.items()}
    one, two = (runs[name]["images_per_s"] for name in SETUPS)
    result = {
        "images": args.images,
        "canvas": args.canvas,
        "min_side": args.min_side,
        "max_side": args.max_side,
        "rows_per_shard": args.rows_per_shard,
        "images_per_s": {name: round(run["images_per_s"], 2) for name, run in runs.items()},
        "speedup_2_nodes_vs_1": round(two / one, 2),
        "node_cpu_s_in_timed_pass": {name: run["node_cpu_s"] for name, run in runs.items()},
        "driver_cpu_s_in_timed_pass": {name: run["driver_cpu_s"] for name, run in runs.items()},
        "load_average_1min": {name: run["load_average_1min"] for name, run in runs.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
