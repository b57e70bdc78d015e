"""Evaluation inference on CPU: in the driver's process with all the threads, in one forked
process per core with one thread each, or on Ray Data actor pools.

The demo's val split (the shapes dataset: 80 images, preprocessed for the demo's model at
canvas 192) goes through evaluate's inference on this machine (``predict_here``: "here" with
``processes: 1``, "forked" with ``processes: auto``) and its Ray Data actor pool
(``predict_on_actors``) with each pool size, in turn, alternating, on a local Ray with
``--cpus`` CPUs (each timing includes the model's load, the forks or the actors' start-up); the
model has random weights (more detections per image than a trained one: the mask paste weighs
more). Prints JSON: images/s per plan and repeat, and the load average.

    python bench/eval_actors.py --plans here,forked --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import load_average

from maskrcnn.checkpoints import save_model
from maskrcnn.model import MaskRCNN
from pipeline.coco.shapes import write_shapes_dataset
from pipeline.config.params import load_params, model_config
from pipeline.config.settings import AUTO
from pipeline.evaluation.inference import pool_plan, predict_here, predict_on_actors
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PLANS = {"here": 1, "forked": AUTO}  # evaluate.processes of each local plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument(
        "--plans", default="here,forked,1,2", help="here, forked, or an actor pool's size"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-val", type=int, default=80)
    args = p.parse_args()
    params = load_params(ROOT / "params.yaml")
    work = Path(tempfile.mkdtemp(prefix="eval-actors-"))
    summary = write_shapes_dataset(work / "shapes", n_train=1, n_val=args.n_val, seed=0)
    config = model_config(params, num_classes=len(summary["categories"]) + 1)
    split = summary["val"]
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    shards = work / "shards" / "val"
    preprocess_split(
        annotation_file=work / "shapes" / split["annotation_file"],
        images_dir=work / "shapes" / split["images_dir"],
        out_dir=shards,
        model_config=config,
        progress=False,
    )
    torch.manual_seed(0)
    save_model(MaskRCNN(config), work / "model.pt")
    model_bytes = (work / "model.pt").read_bytes()
    model = ray.put(model_bytes)
    manifest = read_manifest(shards)
    runs: dict[str, list[float]] = {}
    start_load = load_average()
    for repeat in range(args.repeats):
        plans = args.plans.split(",")
        for plan_name in plans if repeat % 2 == 0 else reversed(plans):
            common = {
                "shards_dir": shards,
                "manifest": manifest,
                "batch_size": args.batch_size,
                "score_threshold": 0.05,
            }
            started = time.perf_counter()
            if plan_name in LOCAL_PLANS:
                processes = LOCAL_PLANS[plan_name]
                key = (
                    f"in this process x {len(os.sched_getaffinity(0))} thread(s)"
                    if processes == 1
                    else f"{len(os.sched_getaffinity(0))} forked process(es) x 1 thread"
                )
                images, results = predict_here(
                    model_bytes=model_bytes, processes=processes, **common
                )
            else:
                plan = pool_plan(int(plan_name), ray.cluster_resources())
                key = f"{plan.size} actor(s) x {plan.threads} thread(s), {plan.num_cpus:g} CPU each"
                images, results = predict_on_actors(model=model, plan=plan, **common)
            seconds = time.perf_counter() - started
            runs.setdefault(key, []).append(round(len(images) / seconds, 2))
            runs.setdefault(f"{key}: detections", []).append(len(results))
    print(
        json.dumps(
            {
                "images_per_s": runs,
                "images": args.n_val,
                "canvas": config.canvas,
                "load_average": {"start": start_load, "end": load_average()},
            }
        )
    )


if __name__ == "__main__":
    main()
