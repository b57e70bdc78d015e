"""The train stage's own path on one machine: 1 worker x all cores against 1 thread per worker.

``pipeline.training.trainer.train`` as the stage runs it (Ray Data, Ray Train, DDP over gloo
when there are two workers, MLflow on SQLite), params.yaml's model and recipe, the same global
batch, on the demo's kind of data (shapes, 160-320 px), the layouts in turn for ``--rounds``
rounds. Each run's ``images_per_s`` and ``data_wait_fraction`` are the trainer's own (the first
batch included). JSON on stdout; ``bench/step_split.py`` says where a bare step's time goes.

    .venv/bin/python bench/layouts.py --rounds 2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import load_average  # noqa: E402
from e2e import our_recipe  # noqa: E402
from e2e_data import demo_shards  # noqa: E402

from pipeline.config.params import load_params  # noqa: E402
from pipeline.config.settings import TrackingSettings  # noqa: E402
from pipeline.io.ray_runtime import ensure_ray  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402

KEPT = ("images_per_s", "data_wait_fraction", "train_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = p.parse_args()
    load_start = load_average()
    cores = len(os.sched_getaffinity(0))
    params = load_params(args.params)
    layouts = {f"1x{cores}": 1, f"{cores}x1": cores}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ensure_ray(None)
        shards, config = demo_shards(root, params, images=args.images)
        for number in range(args.rounds):
            for name, workers in layouts.items():
                # Each run its own name, so that no round resumes another's checkpoint.
                settings = replace(
                    our_recipe(params, workers=workers, seed=0, steps=args.steps, root=root),
                    checkpoint_every=args.steps,
                    run_name=f"{name}-{number}",
                )
                result = train(
                    settings=settings,
                    model_config=config,
                    shards_dir=shards,
                    tracking=TrackingSettings(uri=f"sqlite:///{root / 'mlflow.db'}"),
                    out_dir=root / "out" / settings.run_name,
                    project_root=root,
                )
                kept = {k: round(result.metrics[k], 3) for k in KEPT}
                runs.append({"layout": name, "round": number, **kept, "load": load_average()})
    median = {
        name: statistics.median(r["images_per_s"] for r in runs if r["layout"] == name)
        for name in layouts
    }
    one, many = layouts
    report = {
        "global_batch": settings.global_batch,
        "steps": args.steps,
        "runs": runs,
        "median_images_per_s": median,
        f"{one}_over_{many}": round(median[one] / median[many], 3),
        "load_average": {"start": load_start, "end": load_average()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
