"""Offline RPN target building per image: our sparse matcher vs the dense torchvision-style one.

Baseline: the same targets from the full [N, A] IoU matrix (what torchvision's Matcher does every
training step). Boxes follow COCO-like statistics: instance counts with a long tail, sides
log-uniform between 8 and 800 canvas pixels, 1% crowd. After a warm-up of both on a few
images, each image is built by the two in turn (who goes first alternates), so both see the same
load of a shared machine. Prints JSON: mean, p95 and max wall ms per image, mean CPU ms, and
the load average.

    .venv/bin/python bench/rpn_targets.py --canvas 1024 --images 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import load_average

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import AnchorConfig, RPNConfig
from maskrcnn.rpn_targets import build_rpn_targets


def coco_like_boxes(canvas: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(torch.distributions.Geometric(probs=torch.tensor(1 / 7.3)).sample().item())
    n = max(1, min(n, 90))
    sides = torch.exp(torch.empty(n, 2).uniform_(2.08, 6.68, generator=g))  # 8 .. 800 px
    xy = torch.rand(n, 2, generator=g) * (canvas - sides).clamp(min=1)
    boxes = torch.cat([xy, (xy + sides).clamp(max=canvas)], dim=1)
    return boxes, torch.rand(n, generator=g) < 0.01


def time_ms(fn) -> tuple[float, float]:
    """Wall and CPU milliseconds of ``fn()`` (with one thread, the CPU time is what other jobs
    on the machine do not change)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canvas", type=int, default=1024)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=5, help="images built by both, untimed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    grid = anchor_grid(args.canvas, AnchorConfig())
    config = RPNConfig()
    g = torch.Generator().manual_seed(args.seed)
    cases = [coco_like_boxes(args.canvas, g) for _ in range(args.images)]
    load_at_start = load_average()
    sparse, dense = interleaved(grid, config, cases, warmup=args.warmup)
    result = {
        "canvas": args.canvas,
        "anchors": grid.num_anchors,
        "images": args.images,
        "threads": args.threads,
        "mean_instances": statistics.mean(len(c[0]) for c in cases),
        "warmup": args.warmup,
        "ours_sparse_ms": summary([wall for wall, _ in sparse]),
        "baseline_dense_ms": summary([wall for wall, _ in dense]),
        "speedup_mean": statistics.mean(w for w, _ in dense)
        / statistics.mean(w for w, _ in sparse),
        "cpu_ms_mean": {"ours_sparse": cpu_mean(sparse), "baseline_dense": cpu_mean(dense)},
        "speedup_cpu_mean": cpu_mean(dense) / cpu_mean(sparse),
        "load_average": {"start": load_at_start, "end": load_average()},
    }
    print(json.dumps(result, indent=2))


def interleaved(grid, config: RPNConfig, cases: list, *, warmup: int) -> tuple[list, list]:
    """Per-image ms of the sparse and the dense build, image by image in turn."""

    def sparse(c):
        return build_rpn_targets(grid, *c, config)

    def dense(c):
        return build_rpn_targets(grid, *c, config, dense=True)

    for case in cases[:warmup]:
        sparse(case), dense(case)
    times: dict = {sparse: [], dense: []}
    for i, case in enumerate(cases):
        order = (sparse, dense) if i % 2 else (dense, sparse)  # no first-mover bias
        for build in order:
            times[build].append(time_ms(lambda b=build, c=case: b(c)))
    return times[sparse], times[dense]


def cpu_mean(times: list[tuple[float, float]]) -> float:
    return statistics.mean(cpu for _, cpu in times)


def summary(values: list[float]) -> dict[str, float]:
    p95 = sorted(values)[int(0.95 * (len(values) - 1))]
    return {"mean": statistics.mean(values), "p95": p95, "max": max(values)}


if __name__ == "__main__":
    main()
