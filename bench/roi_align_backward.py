"""RoIAlign on CPU: torchvision's forward and backward vs our backward, level by level.

What one training step of ``bench/model_step.py``'s CPU model pools: P2..P5 features
``[batch, channels, canvas/stride, canvas/stride]``; ``--box-rois`` sampled RoIs per image into
7x7 bins (box head) and ``--mask-rois`` of them into 14x14 (mask head), sampling ratio 2. Boxes
have sides log-uniform between 16 px and half the canvas, and go to the level the FPN rule
gives (``maskrcnn.pooling.MultiLevelRoIAlign.levels``). For each pooling and level, in turn
for ``--repeats`` rounds: torchvision's ``roi_align`` forward, its backward, and the backward of
``maskrcnn.roi_align_cpu.roi_align_fast_grad`` (same forward), whose feature gradient is checked
against torchvision's. Prints JSON: CPU ms of this process (mean over the repeats; with
``--threads 1``, the work itself), per level and in all.

    .venv/bin/python bench/roi_align_backward.py --canvas 512 --batch 2 --channels 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from common import load_average
from torchvision.ops import roi_align

from maskrcnn.anchors import STRIDES
from maskrcnn.pooling import MultiLevelRoIAlign, rois_with_image_index
from maskrcnn.roi_align_cpu import roi_align_fast_grad


def random_boxes(count: int, canvas: int, g: torch.Generator) -> torch.Tensor:
    log_sides = torch.empty(count, 2).uniform_(math.log(16), math.log(canvas / 2), generator=g)
    sides = torch.exp(log_sides)
    corner = torch.rand(count, 2, generator=g) * (canvas - sides)
    return torch.cat([corner, corner + sides], dim=1)


def timed_ms(fn) -> tuple[float, object]:
    """CPU milliseconds of ``fn()`` in this process (all its threads): unlike the wall time,
    not stretched by other jobs on a shared machine."""
    start = time.process_time()
    out = fn()
    return (time.process_time() - start) * 1e3, out


def one_level(feature: torch.Tensor, rois: torch.Tensor, size: int, stride: int) -> dict:
    """Forward and backward times of both implementations on one level, and the gradient gap."""
    args = ((size, size), 1.0 / stride, 2)
    times = {}
    grads = {}
    for name in ("torchvision", "ours"):
        leaf = feature.detach().requires_grad_(True)
        if name == "torchvision":
            ms, out = timed_ms(lambda f=leaf: roi_align(f, rois, *args, aligned=False))
            times["torchvision_forward_ms"] = ms
        else:
            _, out = timed_ms(lambda f=leaf: roi_align_fast_grad(f, rois, *args))
        grad = torch.ones_like(out)
        ms, _ = timed_ms(lambda o=out, g=grad: o.backward(g))
        times[f"{name}_backward_ms"] = ms
        grads[name] = leaf.grad
    gap = (grads["ours"] - grads["torchvision"]).abs().max().item()
    return {**times, "max_grad_difference": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--box-rois", type=int, default=512, help="per image, 7x7 bins")
    parser.add_argument("--mask-rois", type=int, default=128, help="per image, 14x14 bins")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    strides = STRIDES[:4]
    features = [
        torch.randn(args.batch, args.channels, args.canvas // s, args.canvas // s, generator=g)
        for s in strides
    ]
    assign = MultiLevelRoIAlign(output_size=7, sampling_ratio=2)
    load_at_start = load_average()
    result: dict = {"settings": vars(args), "threads_used": torch.get_num_threads()}
    for pooling, per_image, size in (("box", args.box_rois, 7), ("mask", args.mask_rois, 14)):
        rois = rois_with_image_index(
            [random_boxes(per_image, args.canvas, g) for _ in range(args.batch)]
        )
        levels = assign.levels(rois[:, 1:])
        rows = {}
        for level, (feature, stride) in enumerate(zip(features, strides, strict=True)):
            chosen = rois[levels == level]
            one_level(feature, chosen, size, stride)  # warm-up
            runs = [one_level(feature, chosen, size, stride) for _ in range(args.repeats)]
            rows[f"P{level + 2}"] = {"rois": len(chosen), **_mean(runs)}
        result[pooling] = rows
    keys = ("torchvision_forward_ms", "torchvision_backward_ms", "ours_backward_ms")
    total = {k: sum(row[k] for p in ("box", "mask") for row in result[p].values()) for k in keys}
    total["backward_speedup"] = total["torchvision_backward_ms"] / total["ours_backward_ms"]
    result["total_per_step"] = {k: round(v, 1) for k, v in total.items()}
    result["load_average"] = {"start": load_at_start, "end": load_average()}
    print(json.dumps(result, indent=2))


def _mean(runs: list[dict]) -> dict:
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if k != "max_grad_difference"}
    mean = {k: round(v, 2) for k, v in mean.items()}
    mean["backward_speedup"] = round(mean["torchvision_backward_ms"] / mean["ours_backward_ms"], 2)
    mean["max_grad_difference"] = max(r["max_grad_difference"] for r in runs)
    return mean


if __name__ == "__main__":
    main()
