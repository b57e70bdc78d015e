"""Where a training step's time goes: 1 worker x 2 threads against 2 workers x 1 thread.

Both layouts train params.yaml's model (random init, channels_last as the training workers
run it) on the same global batch from the same shards, in turn, each in fresh processes
(``torch.multiprocessing``, gloo between the two workers as Ray Train sets it up). Every step
is cut into phases, each timed on every rank and reported as rank 0's mean milliseconds:

- data: the next batch from the shard loader (``iter_batches``: decode, paste, mask crops, RPN
  sample), in the step's own process; the training stage gets it from Ray Data's prefetch,
  where it overlaps the model's work (its "data wait" is what is left over);
- forward: the model and its five losses;
- backward: gradients, without DDP's all-reduce (``no_sync``);
- all-reduce: the gradients averaged over the workers, one flat gloo all-reduce (DDP does it in
  buckets, overlapped with the backward: an upper bound of what it adds);
- optimizer: AdamW's step.

What the whole Ray Train path adds on top (Ray Data, the controller, reports, MLflow) is the gap
to ``bench/train.py``'s images/s on the same layout. JSON on stdout.

    .venv/bin/python bench/step_split.py --rounds 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import load_average, start_local_ray  # noqa: E402
from e2e_data import demo_shards  # noqa: E402

from maskrcnn.config import ModelConfig  # noqa: E402
from maskrcnn.model import MaskRCNN  # noqa: E402
from pipeline.config.params import load_params  # noqa: E402
from pipeline.config.settings import TrainSettings  # noqa: E402
from pipeline.io.network import free_port  # noqa: E402
from pipeline.training.batch import mask_crop_size  # noqa: E402
from pipeline.training.loader import iter_batches  # noqa: E402
from pipeline.training.schedule import make_optimizer  # noqa: E402

PHASES = ("data", "forward", "backward", "all_reduce", "optimizer")
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=2, help="runs of each layout, in turn")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    return p.parse_args()


def worker(rank: int, world: int, threads: int, port: int, job: dict, out: dict) -> None:
    """One rank: ``warmup`` + ``steps`` steps, each phase timed; rank 0's means into ``out``."""
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = ModelConfig.from_dict(job["config"])
    torch.manual_seed(0)
    model = MaskRCNN(config).to(memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        dist.broadcast(p.data, 0)
    optimizer = make_optimizer(params, TrainSettings.from_dict(job["settings"]))
    batches = _batches(job, config, batch=job["global_batch"] // world, rank=rank, world=world)
    times = {phase: [] for phase in PHASES}
    for step in range(job["warmup"] + job["steps"]):
        marks = [time.perf_counter()]
        images, targets = next(batches)
        marks.append(time.perf_counter())
        losses = model(images.contiguous(memory_format=torch.channels_last), targets)
        total = sum(losses.values())
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        marks.append(time.perf_counter())
        if world > 1:
            grads = [p.grad for p in params if p.grad is not None]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= world
            for g, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(averaged)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if step >= job["warmup"]:
            for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                times[phase].append((end - start) * 1000)
    if rank == 0:
        out.update({phase: round(statistics.mean(ms), 1) for phase, ms in times.items()})
        step_ms = sum(out[phase] for phase in PHASES)
        out.update(
            step_ms=round(step_ms, 1), images_per_s=round(job["global_batch"] / step_ms * 1000, 2)
        )
    dist.destroy_process_group()


def _batches(job: dict, config: ModelConfig, *, batch: int, rank: int, world: int):
    """This rank's batches, epoch after epoch: the shuffled stream, seeded per rank and epoch
    (the same kind of batches on every rank; the ranks need not split the images here)."""
    epoch = 0
    while True:
        yield from iter_batches(job["shards"], batch_size=batch, model_config=config,
                                shuffle=True, seed=epoch * world + rank, flip_prob=0.5,
                                drop_last=True, crop_size=mask_crop_size(config))  # fmt: skip
        epoch += 1


def run_layout(name: str, job: dict) -> dict:
    world, threads = LAYOUTS[name]
    out = mp.Manager().dict()
    mp.spawn(worker, args=(world, threads, free_port(), job, out), nprocs=world, join=True)
    return {"layout": name, "workers": world, "threads": threads, **dict(out)}


def main() -> None:
    args = parse_args()
    load_start = load_average()
    settings = load_params(args.params).settings(TrainSettings)
    with tempfile.TemporaryDirectory() as tmp:
        start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        shards, config = demo_shards(Path(tmp), load_params(args.params), images=args.images)
        ray.shutdown()  # only preprocess needed it: the layouts have the cores to themselves
        job = {
            "config": config.to_dict(),
            "shards": str(shards / "train"),
            "global_batch": settings.global_batch,
            "settings": settings.to_dict(),
            "warmup": args.warmup,
            "steps": args.steps,
        }
        runs = [run_layout(name, job) for _ in range(args.rounds) for name in LAYOUTS]
    summary = {
        name: {k: statistics.median(r[k] for r in runs if r["layout"] == name)
               for k in (*PHASES, "step_ms", "images_per_s")}
        for name in LAYOUTS
    }  # fmt: skip
    report = {
        "global_batch": settings.global_batch,
        "images": args.images,
        "steps": args.steps,
        "model": job["config"],
        "runs": runs,
        "median": summary,
        "images_per_s_2x1_over_1x2": round(
            summary["2x1"]["images_per_s"] / summary["1x2"]["images_per_s"], 3
        ),
        "load_average": {"start": load_start, "end": load_average()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
