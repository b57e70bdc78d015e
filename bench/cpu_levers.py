"""CPU levers on our model: the default memory layout against channels_last, in turn.

Two measurements, each alternating the two layouts of one model in one process:

- eval: the model's forward in eval mode on a batch of canvas-sized images (what ``Detector``
  runs, post-processing on the canvas included, pasting at the original size not);
- train: one training step (forward, the five losses, backward) on the loader's kind of batch
  (``bench/model_step.py``'s synthetic one), as one worker of the demo's layout runs it.

``--profile`` adds where an eval forward's CPU time goes, for our model and for torchvision's
``MaskRCNN`` with the same weights (``bench/torchvision_loop.py``): the total and the share of
the operators that take the most.

With ``--model`` the weights are a trained model's (detections, hence the mask head's work,
are then realistic); without it the model is params.yaml's, randomly initialised.

    .venv/bin/python bench/cpu_levers.py --model W/seed0/ours/train/model.pt --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import in_turn, load_average
from model_step import synthetic_batch
from torch.profiler import profile
from torchvision_loop import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskrcnn import MaskRCNN  # noqa: E402
from maskrcnn.checkpoints import load_model  # noqa: E402
from pipeline.config.params import load_params, model_config  # noqa: E402

LAYOUTS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model file (default: params.yaml's, random)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--threads", type=int, default=2, help="torch threads (eval)")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads (train step)")
    p.add_argument("--eval-batch", type=int, default=8, help="evaluate.batch_size's default")
    p.add_argument("--train-batch", type=int, default=4, help="train.batch_per_worker's")
    p.add_argument("--instances", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per round and layout")
    p.add_argument("--profile", action="store_true", help="also profile an eval forward")
    return p.parse_args(argv)


def base_model(args: argparse.Namespace) -> MaskRCNN:
    if args.model:
        return load_model(args.model)
    return MaskRCNN(model_config(load_params(args.params), num_classes=6))


def alternate(calls: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict:
    """Each layout's seconds per call, the layouts in turn within every round."""
    timed = in_turn(calls, rounds=args.rounds, repeats=args.repeats)
    median = timed["median_s"]
    return {**timed, "speedup_channels_last": round(median["default"] / median["channels_last"], 3)}


def in_layouts(model: MaskRCNN) -> dict[str, MaskRCNN]:
    """A copy of ``model`` in each layout."""
    return {name: copy.deepcopy(model).to(memory_format=f) for name, f in LAYOUTS.items()}


def measure_eval(model: MaskRCNN, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    canvas = model.config.canvas
    images = torch.randint(0, 256, (args.eval_batch, 3, canvas, canvas), dtype=torch.uint8)
    models = {name: m.eval() for name, m in in_layouts(model).items()}
    with torch.inference_mode():
        return alternate({name: lambda m=m: m(images) for name, m in models.items()}, args)


def measure_train(model: MaskRCNN, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.train_threads)
    images, targets = synthetic_batch(model.config, args.train_batch, args.instances)
    models = {name: m.train() for name, m in in_layouts(model).items()}

    def step(m: MaskRCNN) -> None:
        losses = m(images, targets)
        sum(losses.values()).backward()
        for p in m.parameters():
            p.grad = None

    return alternate({name: lambda m=m: step(m) for name, m in models.items()}, args)


def profile_eval(model: MaskRCNN, args: argparse.Namespace, top: int = 8) -> dict:
    """CPU time of one eval forward (default layout) by operator, ours and torchvision's."""
    torch.set_num_threads(args.threads)
    canvas = model.config.canvas
    images = torch.randint(0, 256, (args.eval_batch, 3, canvas, canvas), dtype=torch.uint8)
    theirs = build_model(model.config)
    theirs.load_state_dict(model.state_dict(), strict=True)
    inputs = {"ours": images, "torchvision": list(images.float() / 255)}
    report = {}
    with torch.inference_mode():
        for name, net in {"ours": model.eval(), "torchvision": theirs.eval()}.items():
            net(inputs[name])  # warm-up
            with profile() as prof:
                net(inputs[name])
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in ops)
            report[name] = {
                "cpu_s": round(total / 1e6, 3),
                "share": {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:top]},
            }
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = base_model(args)
    report = {
        "model": str(args.model) if args.model else "params.yaml, random init",
        "load_average": {"start": load_average()},
        "eval": {"threads": args.threads, "batch": args.eval_batch, **measure_eval(model, args)},
        "train": {
            "threads": args.train_threads,
            "batch": args.train_batch,
            **measure_train(model, args),
        },
    }
    if args.profile:
        report["profile_eval"] = profile_eval(model, args)
    report["load_average"]["end"] = load_average()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
