"""CPU lever: ``torch.compile`` (inductor) of the backbone and FPN, against eager, in turn.

The canvas is fixed, so the backbone and FPN see static shapes; what follows them (proposals,
RoI sampling, post-processing) has data-dependent shapes and stays eager. Both models are
channels_last, as the training workers and ``Detector`` run them. Two measurements, each
alternating eager and compiled within every round, after the compiled model's first calls
(reported as ``compile_s``: what a run pays once, before its first step):

- eval: the forward in eval mode on a batch of canvas-sized images;
- train: one training step (forward, five losses, backward) on ``bench/model_step.py``'s
  synthetic batch, at params.yaml's batch per worker and one worker's threads.

    .venv/bin/python bench/compile.py --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import in_turn, load_average
from model_step import synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskrcnn import MaskRCNN  # noqa: E402
from pipeline.config.params import load_params, model_config  # noqa: E402
from pipeline.config.settings import TrainSettings  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--instances", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per round and side")
    return p.parse_args()


def pair(model: MaskRCNN) -> dict[str, MaskRCNN]:
    """Eager and compiled copies of ``model`` (compilation is lazy: at the first call)."""
    eager = copy.deepcopy(model).to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.backbone = torch.compile(compiled.backbone, dynamic=False)
    return {"eager": eager, "compiled": compiled}


def alternate(calls: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict:
    """First-call seconds (compilation), then each side's seconds per call in turn (after a
    further warm-up call: inductor may recompile once for the grad mode)."""
    first = {}
    for name, fn in calls.items():
        start = time.perf_counter()
        fn()
        first[name] = round(time.perf_counter() - start, 2)
    timed = in_turn(calls, rounds=args.rounds, repeats=args.repeats)
    median = timed["median_s"]
    return {
        "first_call_s": first,
        **timed,
        "speedup_compiled": round(median["eager"] / median["compiled"], 3),
    }


def measure_eval(model: MaskRCNN, args: argparse.Namespace) -> dict:
    canvas = model.config.canvas
    images = torch.randint(0, 256, (args.eval_batch, 3, canvas, canvas), dtype=torch.uint8)
    models = pair(model)
    for m in models.values():
        m.eval()

    def forward(m: MaskRCNN) -> None:
        with torch.inference_mode():
            m(images)

    return alternate({name: lambda m=m: forward(m) for name, m in models.items()}, args)


def measure_train(model: MaskRCNN, args: argparse.Namespace, batch: int) -> dict:
    images, targets = synthetic_batch(model.config, batch, args.instances)
    models = pair(model)

    def step(m: MaskRCNN) -> None:
        losses = m.train()(images, targets)
        sum(losses.values()).backward()
        for p in m.parameters():
            p.grad = None

    return {"batch": batch, **alternate({n: lambda m=m: step(m) for n, m in models.items()}, args)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    torch.manual_seed(0)
    model = MaskRCNN(model_config(params, num_classes=6))
    batch = params.settings(TrainSettings).batch_per_worker
    report = {
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average": {"start": load_average()},
        "eval": {"batch": args.eval_batch, **measure_eval(model, args)},
        "train": measure_train(model, args, batch),
    }
    report["load_average"]["end"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
