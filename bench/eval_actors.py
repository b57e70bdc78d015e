"""Evaluation inference on CPU: in the driver's process, one actor with all the threads, or
several one-thread actors.

The demo's val split (the shapes dataset: 80 images, preprocessed for the demo's model at
canvas 192) goes through evaluate's inference in this process (``predict_here``, "local") and
its Ray Data actor pool (``predict_on_actors``) with each pool size, in turn, alternating, on a
local Ray with ``--cpus`` CPUs (each timing includes the actors' start-up); the model has
random weights (more detections per image than a trained one: the mask paste weighs more).
Prints JSON: images/s per plan and repeat, and the load average.

    python bench/eval_actors.py --repeats 2
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
from pipeline.evaluation.inference import LOCAL, pool_plan, predict_here, predict_on_actors
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--actors", default="local,1,2", help="pool sizes to compare (local: none)")
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
        sizes = [a if a == LOCAL else int(a) for a in args.actors.split(",")]
        for size in sizes if repeat % 2 == 0 else reversed(sizes):
            common = {
                "shards_dir": shards,
                "manifest": manifest,
                "batch_size": args.batch_size,
                "score_threshold": 0.05,
            }
            started = time.perf_counter()
            if size == LOCAL:
                key = f"in this process x {len(os.sched_getaffinity(0))} thread(s)"
                images, results = predict_here(model_bytes=model_bytes, **common)
            else:
                plan = pool_plan(size, ray.cluster_resources())
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
