"""Host syncs per step of our model and of torchvision's, counted by CUDA's sync debug mode.

``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronizing CUDA call (``.item()``,
``.cpu()``, ``nonzero``, a blocking copy from pageable memory, ...); one train step (forward,
backward, optimizer step, as the training loop runs it but without its logging) and one
inference step of each model (model_step's setup: same weights and batch) are counted after a
warm-up, without model_step's timing syncs. With fp16 the GradScaler's inf check is one of
them. On a CPU there is nothing to count and the JSON says so.

    python bench/gpu_sync_count.py --backbone resnet50 --canvas 1024 --batch 8 --device cuda
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from functools import partial

import torch
from model_step import Runner, build_runners, parse_args


def train_once(runner: Runner) -> None:
    runner.model.train()
    with runner.autocast():
        losses = runner.model(runner.images, runner.targets)
    runner.optimizer.zero_grad(set_to_none=True)
    runner.scaler.scale(sum(losses.values())).backward()
    runner.scaler.step(runner.optimizer)
    runner.scaler.update()


def infer_once(runner: Runner) -> None:
    runner.model.eval()
    with torch.no_grad(), runner.autocast():
        runner.model(runner.images)


def count_syncs(step) -> tuple[int, list[tuple[str, int]]]:
    """Synchronizing calls during ``step()``: how many, and the most frequent call sites."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in syncs)
    return len(syncs), sites.most_common(12)


def main() -> None:
    args = parse_args()
    if not args.device.startswith("cuda"):
        print(json.dumps({"skipped": f"device {args.device}: no CUDA syncs to count"}))
        return
    report = {}
    for name, runner in build_runners(args).items():
        for _ in range(max(1, args.warmup)):
            train_once(runner)
            infer_once(runner)
        train, train_sites = count_syncs(partial(train_once, runner))
        infer, infer_sites = count_syncs(partial(infer_once, runner))
        report[name] = {
            "train_syncs_per_step": train,
            "infer_syncs_per_step": infer,
            "train_top_sites": train_sites,
            "infer_top_sites": infer_sites,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
