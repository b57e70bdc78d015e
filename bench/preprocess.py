"""Preprocess throughput with 1 and 2 Ray workers, and peak memory for N vs 10N images.

Each measurement runs in a fresh process with its own local Ray (``num_cpus`` = workers):

- throughput: one warm-up pass (worker start-up and imports take seconds, once per Ray
  session), then the faster of two timed passes; images/s, and the CPU time per image spent in
  the driver and in all processes (the driver's share bounds the speed-up from more workers).
  The 1-minute load average is recorded: on a shared machine, other work takes cores, and
  ``--repeats`` alternates the two settings and keeps the best run of each. A control measures
  what two processes of pure CPU work get over one on this machine at the time (2.0 when two
  cores are free).
- memory: preprocess N and then 10N images (``rows_per_shard`` fixed), each in a fresh process
  (``MALLOC_MMAP_THRESHOLD_=65536``, as ``bench/model_step.py``): the driver's peak RSS
  (``VmHWM``), and the peak of the resident memory of the driver and every process under it
  (raylet, Ray workers), sampled every 50 ms. The driver's peak is what would grow if rows were
  collected instead of streamed.

Also the time to build one image's RPN targets (plain + flipped) at canvas 1024, 1 thread.
Prints JSON, with the load averages.

    .venv/bin/python bench/preprocess.py --images 64 --canvas 512 --memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    add_shapes_args,
    load_average,
    peak_rss_mb,
    run_fresh_child,
    run_json_child,
    start_local_ray,
)

from maskrcnn.anchors import anchor_grid  # noqa: E402
from maskrcnn.config import ModelConfig  # noqa: E402
from maskrcnn.rpn_targets import build_rpn_targets  # noqa: E402
from pipeline.coco.reader import instance_boxes, read_coco  # noqa: E402
from pipeline.coco.shapes import write_shapes_dataset  # noqa: E402
from pipeline.io.images import canvas_scale, resized_size  # noqa: E402
from pipeline.shards.preprocess import preprocess_split  # noqa: E402


def make_dataset(root: Path, args: argparse.Namespace, images: int) -> dict[str, Path]:
    write_shapes_dataset(
        root, n_train=images, n_val=1, seed=0, min_side=args.min_side, max_side=args.max_side
    )
    return {
        "annotation_file": root / "annotations" / "instances_train.json",
        "images_dir": root / "images" / "train",
    }


class PeakMemory:
    """Samples the RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker may exit meanwhile
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval_s)


def tree_cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process, and by it plus all its descendants (Ray)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    mine = me.cpu_times()
    return mine.user + mine.system, total


def timed_pass(source: dict, out_dir: Path, run: dict, args) -> dict:
    """images/s of one preprocess pass, with the CPU it used in the driver and in all of Ray."""
    cpu, start = tree_cpu_seconds(), time.perf_counter()
    preprocess_split(**source, out_dir=out_dir, **run)
    seconds = time.perf_counter() - start
    driver, everything = (
        after - before for after, before in zip(tree_cpu_seconds(), cpu, strict=True)
    )
    return {
        "images_per_s": args.images / seconds,
        "cpu_ms_per_image": {
            "driver": 1e3 * driver / args.images,
            "all_processes": 1e3 * everything / args.images,
        },
        "load_average_1min": os.getloadavg()[0],
    }


def _spin(units: int) -> float:
    start, x = time.perf_counter(), 0
    for i in range(units):
        x += i * i
    return time.perf_counter() - start


def control_speedup() -> float:
    """What 2 processes get over 1 on this machine for pure CPU work (2.0 on 2 free cores)."""
    one = _spin(5_000_000)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [1, 1])  # the workers import this module first
        start = time.perf_counter()
        pool.map(_spin, [5_000_000, 5_000_000])
        return 2 * one / (time.perf_counter() - start)


def run_child(args: argparse.Namespace, *extra: str) -> dict:
    sizes = {"--canvas": args.canvas, "--min-side": args.min_side, "--max-side": args.max_side}
    flags = [str(v) for pair in sizes.items() for v in pair]
    command = [sys.executable, __file__, *flags, *extra]
    return run_fresh_child(command) if "memory" in extra else run_json_child(command)


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process: throughput (--workers) or memory (--images)."""
    config = ModelConfig(num_classes=6, canvas=args.canvas)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_dataset(Path(tmp) / "data", args, args.images)
        start_local_ray(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        run = {"model_config": config, "rows_per_shard": args.rows_per_shard, "progress": False}
        try:
            if args.child == "throughput":
                preprocess_split(**source, out_dir=Path(tmp) / "warm", **run)
                return min(
                    (timed_pass(source, Path(tmp) / f"pass{i}", run, args) for i in range(2)),
                    key=lambda r: -r["images_per_s"],
                )
            with PeakMemory() as memory:
                preprocess_split(**source, out_dir=Path(tmp) / "train", **run)
            return {"driver_peak_mb": peak_rss_mb(), "tree_peak_mb": memory.peak / 2**20}
        finally:
            ray.shutdown()


def rpn_target_ms(args: argparse.Namespace) -> dict:
    """Per-image time of the two RPN target builds preprocess does, at canvas 1024."""
    torch.set_num_threads(1)
    config = ModelConfig(num_classes=6, canvas=1024)
    grid = anchor_grid(1024, config.anchors)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_dataset(Path(tmp), args, min(args.images, 64))
        records = read_coco(**source).records
    times = []
    for record in records:
        scale = canvas_scale(record.height, record.width, 1024)
        width = resized_size(record.height, record.width, scale)[1]
        boxes = instance_boxes(record, scale=scale)
        flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        crowd = torch.tensor([i.iscrowd for i in record.instances], dtype=torch.bool)
        start = time.perf_counter()
        for b in (boxes, flipped):
            build_rpn_targets(grid, torch.from_numpy(b), crowd, config.rpn)
        times.append((time.perf_counter() - start) * 1e3)
    times = times[1:]  # the first call warms caches
    return {"mean": statistics.mean(times), "max": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shapes_args(parser, images=64)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--memory", action="store_true", help="also peak memory, N vs 10N")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many, per setting")
    parser.add_argument("--child", choices=("throughput", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    load_at_start = load_average()
    common = ("--images", str(args.images), "--rows-per-shard", str(args.rows_per_shard))
    runs: dict[int, dict] = {}
    controls = []
    for _ in range(args.repeats):  # alternate 1 and 2 workers; keep each one's best run
        controls.append(control_speedup())
        for w in (1, 2):
            run = run_child(args, "--child", "throughput", "--workers", str(w), *common)
            if w not in runs or run["images_per_s"] > runs[w]["images_per_s"]:
                runs[w] = run
    speed = {w: run["images_per_s"] for w, run in runs.items()}
    result = {
        "images": args.images,
        "canvas": args.canvas,
        "min_side": args.min_side,
        "max_side": args.max_side,
        "rows_per_shard": args.rows_per_shard,
        "repeats": args.repeats,
        "images_per_s": {f"{w}_workers": round(v, 2) for w, v in speed.items()},
        "speedup_2_vs_1": round(speed[2] / speed[1], 2),
        "control_speedup_2_processes": [round(c, 2) for c in controls],
        "cpu_ms_per_image": {
            f"{w}_workers": {k: round(v, 1) for k, v in run["cpu_ms_per_image"].items()}
            for w, run in runs.items()
        },
        "load_average_1min": {f"{w}_workers": run["load_average_1min"] for w, run in runs.items()},
    }
    if args.memory:
        peaks = {}
        for n in (args.images, 10 * args.images):
            extra = ("--images", str(n), "--rows-per-shard", str(args.rows_per_shard))
            peaks[n] = run_child(args, "--child", "memory", "--workers", "2", *extra)
        small, large = peaks[args.images], peaks[10 * args.images]
        result["peak_memory_mb"] = {
            str(n): {k: round(v, 1) for k, v in p.items()} for n, p in peaks.items()
        }
        result["peak_ratio_10x"] = {
            k: round(large[k] / small[k], 3) for k in ("driver_peak_mb", "tree_peak_mb")
        }
        result["memory"] = "driver: VmHWM of a fresh process (MALLOC_MMAP_THRESHOLD_=65536)"
    result["rpn_targets_ms_per_image_canvas_1024"] = {
        k: round(v, 2) for k, v in rpn_target_ms(args).items()
    }
    result["load_average"] = {"start": load_at_start, "end": load_average()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
