"""End to end: our pipeline against a plain torchvision loop, same data, model, recipe and budget.

On a generated COCO-format dataset that is not the demo's (another seed, more instances and
crowds, fewer empty images, another range of image sizes), for each seed in turn:

1. ours: the pipeline's own path, called as its stages call it: ``preprocess_split`` to Parquet
   shards (once, shared by the seeds), ``pipeline.training.trainer.train`` on Ray Train
   (1 or 2 workers), ``pipeline.evaluation.evaluate.evaluate`` on the val shards;
2. torchvision: ``bench/torchvision_loop.py``, a ``DataLoader`` over the COCO files (PIL decode,
   pycocotools masks, flips on every step) into torchvision's ``MaskRCNN`` built from torchvision
   parts at the same configuration, then a one-process eval loop.

Both get params.yaml's model section and train recipe (AdamW, warm-up + cosine, the global
batch) and the same seconds of pure training: ours trains a schedule sized to ``--budget-s`` by
its pace (measured on its first batch for the first seed, from the previous run after that), and
the torchvision loop then trains for as many seconds as ours took, its schedule sized to its own
pace. Start-up (Ray, worker group, model files) is reported apart. Both sides' detections are
scored by the same pycocotools ``COCOeval`` call on the same val split. JSON on stdout, logs on
stderr.

    .venv/bin/python bench/e2e.py --budget-s 90 --seeds 0 1 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import operator
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torchvision_loop as tv  # noqa: E402
from common import load_average  # noqa: E402
from e2e_data import make_dataset, preprocess, split_files, start_ray  # noqa: E402
from model_step import synthetic_batch  # noqa: E402

from maskrcnn.config import NORMS, ModelConfig  # noqa: E402
from maskrcnn.model import MaskRCNN  # noqa: E402
from pipeline.config.params import Params, load_params, model_config  # noqa: E402
from pipeline.config.settings import (  # noqa: E402
    EvaluateSettings,
    TrackingSettings,
    TrainSettings,
)
from pipeline.evaluation.evaluate import evaluate  # noqa: E402
from pipeline.shards.schema import read_manifest  # noqa: E402
from pipeline.training.resources import torch_threads, with_worker_cpus  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402

log = logging.getLogger("bench.e2e")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=90.0, help="pure training seconds per side")
    p.add_argument("--steps", type=int, default=0, help="our schedule's length (0: from budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, choices=(1, 2), default=0, help="0: params.yaml's")
    p.add_argument("--threads", type=int, default=0, help="torchvision's torch threads (0: cores)")
    p.add_argument("--loader-workers", type=int, default=1, help="torchvision DataLoader's")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=80)
    p.add_argument("--data-seed", type=int, default=7, help="the demo's dataset is seed 0")
    p.add_argument("--min-side", type=int, default=128)
    p.add_argument("--max-side", type=int, default=384)
    p.add_argument("--max-instances", type=int, default=8)
    p.add_argument("--crowd-fraction", type=float, default=0.15)
    p.add_argument("--empty-fraction", type=float, default=0.03)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--norm", choices=NORMS, help="model.norm for both sides (default: params')")
    p.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary dir)")
    return p.parse_args(argv)


@contextlib.contextmanager
def json_stdout() -> Iterator[Any]:
    """Everything written to fd 1 (Ray's workers included) goes to stderr meanwhile; the
    yielded stream is the real stdout, for the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def our_recipe(params: Params, *, workers: int, seed: int, steps: int, root: Path) -> TrainSettings:
    """params.yaml's train section at ``workers`` workers, the same global batch, and no
    evaluations during training (the plain loop has none: both sides train the whole budget)."""
    base = params.settings(TrainSettings)
    batch = base.global_batch
    if batch % workers:
        raise ValueError(f"the global batch {batch} does not split over {workers} workers")
    return replace(
        base,
        num_workers=workers,
        batch_per_worker=batch // workers,
        grad_accum=1,
        cpus_per_worker=None,  # the machine's CPUs shared out, as the train stage does
        steps=steps,
        seed=seed,
        storage_path=str(root / "ray_results"),
        run_name=f"e2e-seed{seed}",
        eval_every=0,
        select="last",
        patience=0,
    )


def pace_probe(config: ModelConfig, recipe: TrainSettings) -> float:
    """Images/s of one worker's train step on a synthetic batch, times the workers: a first
    guess of our pace, before any run has measured it."""
    one_machine = with_worker_cpus(recipe, ray_cpus=cores(), nodes=1, streamed=False)
    torch.set_num_threads(torch_threads(one_machine))  # as the trainer shares them out
    torch.manual_seed(0)
    model = MaskRCNN(config).train()
    images, targets = synthetic_batch(config, recipe.batch_per_worker, instances=4)
    times = []
    for _ in range(2):  # the first one warms up
        start = time.perf_counter()
        sum(model(images, targets).values()).backward()
        times.append(time.perf_counter() - start)
    return recipe.global_batch / times[-1]


def run_ours(
    *, recipe: TrainSettings, config: ModelConfig, root: Path, data: Path, params: Params
) -> dict[str, Any]:
    out = root / f"seed{recipe.seed}" / "ours"
    load = load_average()
    started = time.perf_counter()
    result = train(
        settings=recipe,
        model_config=config,
        shards_dir=root / "shards",
        tracking=TrackingSettings(experiment="bench-e2e"),
        out_dir=out / "train",
        project_root=root,
    )
    wall = time.perf_counter() - started
    metrics = result.metrics
    return {
        "steps": int(metrics["step"]),
        "train_s": round(metrics["train_s"], 2),
        "images_per_s": round(metrics["images_per_s"], 3),
        "data_wait_fraction": round(metrics["data_wait_fraction"], 4),
        "startup_s": round(wall - metrics["train_s"], 2),
        "loss": round(float(metrics.get("loss", float("nan"))), 4),
        "load_average": load,
        "model_path": str(result.model_path),
    }


def eval_ours(
    model_path: Path, *, shards: Path, data: Path, out: Path, params: Params, gt
) -> dict[str, Any]:
    """The evaluate stage's call on the val shards (``shards``); its predictions rescored by
    the same COCOeval call as torchvision's."""
    load = load_average()
    start = time.perf_counter()
    metrics = evaluate(
        model_path=model_path,
        shards_dir=shards,
        annotation_file=split_files(data, "val")["annotation_file"],
        images_dir=split_files(data, "val")["images_dir"],
        out_dir=out,
        **params.settings(EvaluateSettings).to_dict(),
    )
    seconds = time.perf_counter() - start
    results = json.loads((out / "predictions.json").read_text())
    return {
        "eval_images": int(metrics["num_images"]),
        "eval_s": round(seconds, 2),
        "eval_images_per_s": round(metrics["num_images"] / seconds, 3),
        "inference_images_per_s": metrics.get("images_per_second"),
        **tv.coco_ap(gt, results),
        "evaluate_stage_AP": {k: metrics[k] for k in ("bbox_AP", "segm_AP")},
        "eval_load_average": load,
    }


def run_torchvision(
    *,
    recipe: TrainSettings,
    config: ModelConfig,
    data: Path,
    budget_s: float,
    args: argparse.Namespace,
    categories: list[dict],
    params: Params,
) -> dict[str, Any]:
    """The plain loop for ``budget_s`` seconds, then its one-process evaluation."""
    load = load_average()
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = tv.build_model(config)
    dataset = tv.CocoInstances(
        **split_files(data, "train"),
        label_of={int(c["id"]): int(c["label"]) for c in categories},
        flip_prob=recipe.flip_prob,
    )
    built = time.perf_counter() - started
    threads = args.threads or cores()
    loop = tv.LoopSettings(budget_s=budget_s, threads=threads, loader_workers=args.loader_workers)
    recipe = replace(recipe, num_workers=1, batch_per_worker=recipe.global_batch)
    trained = tv.train(model=model, dataset=dataset, recipe=recipe, loop=loop)
    trained["startup_s"] = round(trained["startup_s"] + built, 2)
    return {**trained, "load_average": load, **eval_torchvision(model, data, categories, params)}


def eval_torchvision(model, data: Path, categories: list[dict], params: Params) -> dict[str, Any]:
    """Ground truth read, every val image predicted, scored: the seconds of all of it."""
    files = split_files(data, "val")
    load = load_average()
    start = time.perf_counter()
    gt = tv.load_coco(files["annotation_file"])
    settings = params.settings(EvaluateSettings)
    results, images, _ = tv.predict(
        model=model,
        coco=gt,
        images_dir=files["images_dir"],
        category_of={int(c["label"]): int(c["id"]) for c in categories},
        batch_size=settings.batch_size,
        score_threshold=settings.score_threshold,
        threads=cores(),
    )
    scores = tv.coco_ap(gt, results)
    seconds = time.perf_counter() - start
    return {
        "eval_images": images,
        "eval_s": round(seconds, 2),
        "eval_images_per_s": round(images / seconds, 3),
        **scores,
        "eval_load_average": load,
    }


def spread(runs: list[dict[str, Any]], side: str) -> dict[str, Any]:
    """Mean, min and max over the seeds of one side's headline figures."""
    out = {}
    for key in ("images_per_s", "eval_images_per_s", "bbox_AP", "segm_AP", "steps", "startup_s"):
        values = [run[side][key] for run in runs]
        out[key] = dict(mean=round(statistics.fmean(values), 4), min=min(values), max=max(values))
    return out


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    def mean(key: str, op) -> float:
        return round(statistics.fmean(op(r["ours"][key], r["torchvision"][key]) for r in runs), 4)

    return {
        "train_images_per_s_ours_over_torchvision": mean("images_per_s", operator.truediv),
        "eval_images_per_s_ours_over_torchvision": mean("eval_images_per_s", operator.truediv),
        "bbox_AP_ours_minus_torchvision": mean("bbox_AP", operator.sub),
        "segm_AP_ours_minus_torchvision": mean("segm_AP", operator.sub),
    }


def run_all(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    params = load_params(args.params)
    workers = args.workers or params.settings(TrainSettings).num_workers
    data, shards = root / "data", root / "shards"
    dataset = make_dataset(data, args)
    started = time.perf_counter()
    start_ray()
    ray_s = time.perf_counter() - started
    preprocess_s = preprocess(data, shards, params)
    categories = read_manifest(shards / "train")["categories"]
    config = model_config(params, num_classes=len(categories) + 1)
    config = replace(config, norm=args.norm or config.norm)
    gt = tv.load_coco(split_files(data, "val")["annotation_file"])
    pace, runs = 0.0, []
    for seed in args.seeds:
        probe = our_recipe(params, workers=workers, seed=seed, steps=1, root=root)
        pace = pace or pace_probe(config, probe)
        steps = args.steps or max(1, round(args.budget_s * pace / probe.global_batch))
        recipe = replace(probe, steps=steps)
        log.info("seed %d: ours trains %d steps (pace %.2f img/s)", seed, steps, pace)
        ours = run_ours(recipe=recipe, config=config, root=root, data=data, params=params)
        pace = ours["images_per_s"]
        theirs = run_torchvision(
            recipe=recipe,
            config=config,
            data=data,
            budget_s=ours["train_s"],
            args=args,
            categories=categories,
            params=params,
        )
        model_path = Path(ours["model_path"])
        out = model_path.parent.parent / "eval"
        ours.update(
            eval_ours(model_path, shards=shards / "val", data=data, out=out, params=params, gt=gt)
        )
        runs.append({"seed": seed, "ours": ours, "torchvision": theirs})
        log.info("seed %d: %s", seed, json.dumps(runs[-1]))
    recipe_keys = ("optimizer", "base_lr", "lr_reference_batch", "weight_decay", "warmup_steps")
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ours_workers": workers,
        "recipe": {
            **{k: getattr(recipe, k) for k in (*recipe_keys, "schedule", "flip_prob")},
            "global_batch": recipe.global_batch,
            "peak_lr": recipe.lr,
        },
        "model": config.to_dict(),
        "dataset": dataset,
        "cpus": cores(),
        "torch_threads_torchvision": args.threads or cores(),
        "ray_start_s": round(ray_s, 2),
        "preprocess_s": round(preprocess_s, 2),
        "runs": runs,
        "ours": spread(runs, "ours"),
        "torchvision": spread(runs, "torchvision"),
        **ratios(runs),
    }


def report_main(args: argparse.Namespace, run_all: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Run ``run_all(args, workdir)`` in ``args.keep`` or a temporary directory and print its
    report as JSON on stdout, with the load average at the start and the end."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with json_stdout() as stdout:
        load_start = load_average()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            report = run_all(args, args.keep.resolve())
        else:
            with tempfile.TemporaryDirectory() as tmp:
                report = run_all(args, Path(tmp))
        report["load_average"] = {"start": load_start, "end": load_average()}
        stdout.write(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the report as JSON on stdout (and return it, for the tests)."""
    return report_main(parse_args(argv), run_all)


if __name__ == "__main__":
    main()
