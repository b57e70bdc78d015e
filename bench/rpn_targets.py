"""Offline RPN target building per image: our sparse matcher vs the dense torchvision-style one.

Baseline: the same targets from the full [N, A] IoU matrix (what torchvision's Matcher does every
training step). Boxes follow COCO-like statistics: instance counts with a long tail, sides
log-uniform between 8 and 800 canvas pixels, 1% crowd. Prints JSON.

    .venv/bin/python bench/rpn_targets.py --canvas 1024 --images 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

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


def time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canvas", type=int, default=1024)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    grid = anchor_grid(args.canvas, AnchorConfig())
    config = RPNConfig()
    g = torch.Generator().manual_seed(args.seed)
    cases = [coco_like_boxes(args.canvas, g) for _ in range(args.images)]
    build_rpn_targets(grid, *cases[0], config)  # warm-up
    sparse = [time_ms(lambda c=c: build_rpn_targets(grid, *c, config)) for c in cases]
    dense = [time_ms(lambda c=c: build_rpn_targets(grid, *c, config, dense=True)) for c in cases]
    result = {
        "canvas": args.canvas,
        "anchors": grid.num_anchors,
        "images": args.images,
        "threads": args.threads,
        "mean_instances": statistics.mean(len(c[0]) for c in cases),
        "ours_sparse_ms": {"mean": statistics.mean(sparse), "p95": _p95(sparse)},
        "baseline_dense_ms": {"mean": statistics.mean(dense), "p95": _p95(dense)},
        "speedup_mean": statistics.mean(dense) / statistics.mean(sparse),
    }
    print(json.dumps(result, indent=2))


def _p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


if __name__ == "__main__":
    main()
