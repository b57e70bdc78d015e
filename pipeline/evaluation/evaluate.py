"""Stage evaluate's logic: batch inference over the val shards, COCO scores, plots, overlays.

Inference runs on Ray Data: an actor pool whose actors each build the model once (a GPU each
when the cluster has them) and turn batches of shard rows into COCO results in original image
coordinates. The model file is read by the driver and reaches the actors through Ray's object
store, so they need not see the driver's files (on a cluster they run on other nodes). The
driver scores the results with pycocotools against the original annotation file and writes
``metrics.json``, ``pr_curve.csv``, ``predictions.json`` and ``overlays/*.png``, then
logs all of it to the training's MLflow run (metrics prefixed ``eval/``, files under ``eval/``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from maskrcnn.checkpoints import load_model, read_model_info
from pipeline.coco.masks import decode_rle
from pipeline.coco.reader import read_image
from pipeline.evaluation.cocoeval import (
    flat_metrics,
    ground_truth_from_bytes,
    pr_curve_rows,
    score_all,
    summary_table,
    to_coco_results,
)
from pipeline.inference.detector import Detector
from pipeline.inference.overlay import draw_detections, save_overlay
from pipeline.io import storage
from pipeline.io.console import ImageProgress
from pipeline.io.images import decode_rgb
from pipeline.io.ray_runtime import ensure_ray
from pipeline.shards.schema import read_manifest, shard_files

log = logging.getLogger(__name__)

READ_COLUMNS = ["image_id", "file_name", "height", "width", "scale", "image"]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# concurrency "auto" on CPUs: one actor per this many CPUs of the cluster (docs/benchmarks.md,
# "Evaluation actors on CPU": on 2 cores, 2 one-thread actors vs 1 two-thread actor).
CPUS_PER_AUTO_ACTOR = 2


@dataclass(frozen=True)
class PoolPlan:
    """The inference actor pool: how many actors, what each reserves, and its torch threads."""

    size: int
    num_cpus: float
    num_gpus: int
    threads: int


class ShardPredictor:
    """Ray Data actor: builds the model once, then shard rows -> COCO results (JSON per image).

    ``model`` is the model file's bytes in Ray's object store (a ref, fetched here, on whichever
    node the actor runs), never a path: the driver's files are not the actor's. On a GPU the
    model runs under autocast in ``amp`` ("none", "bf16", "fp16": the training's).
    """

    def __init__(
        self,
        *,
        model: ray.ObjectRef | bytes,
        categories: list[dict],
        score_threshold: float,
        threads: int,
        amp: str = "none",
    ) -> None:
        # ``threads``: the actor's share of the cluster's cores, at most its node's.
        torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        raw = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.detector = Detector(load_model(io.BytesIO(raw)), categories=categories, device=device)
        self.score_threshold = score_threshold
        self.amp = AMP_DTYPES.get(amp) if device == "cuda" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [decode_rgb(b) for b in batch["image"]]
        autocast = torch.autocast("cuda", dtype=self.amp) if self.amp else contextlib.nullcontext()
        with autocast:
            detections = self.detector.detect_resized(
                images,
                scales=[float(s) for s in batch["scale"]],
                sizes=list(zip(batch["height"], batch["width"], strict=True)),
                score_threshold=self.score_threshold,
            )
        results = [
            json.dumps(to_coco_results(int(image_id), detection, self.detector.category_ids))
            for image_id, detection in zip(batch["image_id"], detections, strict=True)
        ]
        return {
            "image_id": batch["image_id"],
            "file_name": batch["file_name"],
            "results": np.array(results, dtype=object),
        }


def evaluate(
    *,
    model_path: str | os.PathLike,
    shards_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    batch_size: int = 4,
    score_threshold: float = 0.0,
    num_overlays: int = 8,
    overlay_score_threshold: float = 0.5,
    concurrency: int | str = "auto",
    amp: str = "none",
    ray_address: str | None = None,
    tracking_run: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score the model on the split in ``shards_dir``; write the outputs; return the metrics.

    ``score_threshold`` drops detections before scoring (0 keeps everything the model returns,
    as COCO AP expects); overlays only draw those above ``overlay_score_threshold``.
    ``tracking_run`` is run.json's content (run_id, tracking_uri); None skips MLflow.
    ``concurrency`` is the number of inference actors, or "auto" (``_pool_plan``); ``amp`` the
    autocast dtype of inference on GPUs (the training's ``train.amp``).
    """
    config, _ = read_model_info(model_path)
    model_bytes = Path(model_path).read_bytes()  # into the object store below, once
    manifest = read_manifest(shards_dir)
    if config.canvas != manifest["canvas"]:
        raise ValueError(
            f"{model_path}: the model's canvas is {config.canvas}, but the shards in {shards_dir} "
            f"were made for canvas {manifest['canvas']}: preprocess with the model's canvas"
        )
    raw = storage.read_bytes(annotation_file)  # read once: the ground truth and its sha256
    gt = ground_truth_from_bytes(raw)
    _check_source(manifest, annotation_file, hashlib.sha256(raw).hexdigest())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "overlays", ignore_errors=True)  # none left from an earlier run

    started = time.perf_counter()
    ensure_ray(ray_address)
    images, results = _predict(
        model=ray.put(model_bytes),
        shards_dir=shards_dir,
        manifest=manifest,
        batch_size=batch_size,
        score_threshold=score_threshold,
        plan=_pool_plan(concurrency, ray.cluster_resources()),
        amp=amp,
    )
    del model_bytes
    seconds = time.perf_counter() - started
    log.info(
        "inference: %d images, %d detections in %.1f s (%.2f images/s)",
        len(images),
        len(results),
        seconds,
        len(images) / max(seconds, 1e-9),
    )

    scores = score_all(gt, results, image_ids=[image_id for image_id, _ in images])
    metrics = {
        **flat_metrics(scores),
        "num_images": len(images),
        "num_detections": len(results),
        "images_per_second": round(len(images) / max(seconds, 1e-9), 3),
    }
    log.info("COCO scores (%%) on %d images:\n%s", len(images), summary_table(scores))

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "predictions.json").write_text(json.dumps(results) + "\n")
    _write_csv(out / "pr_curve.csv", pr_curve_rows(scores))
    _write_overlays(
        images[:num_overlays],
        results,
        images_dir=images_dir,
        out_dir=out / "overlays",
        categories=manifest["categories"],
        threshold=overlay_score_threshold,
    )
    if tracking_run:
        log_to_run(tracking_run, metrics, out)
    return metrics


def _predict(
    *,
    model: ray.ObjectRef,
    shards_dir: str | os.PathLike,
    manifest: Mapping[str, Any],
    batch_size: int,
    score_threshold: float,
    plan: PoolPlan,
    amp: str = "none",
) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
    """[(image_id, file_name)] in image-id order, and every image's COCO results."""
    filesystem, paths = shard_files(shards_dir, manifest=manifest)
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, columns=READ_COLUMNS)
    dataset.context.enable_progress_bars = False  # ours instead (ImageProgress): one bar, or lines
    log.info(
        "inference on %d actor(s), each %g CPU, %d GPU, %d torch thread(s), amp %s",
        plan.size,
        plan.num_cpus,
        plan.num_gpus,
        plan.threads,
        amp if plan.num_gpus else "none (CPU)",
    )
    predicted = dataset.map_batches(
        ShardPredictor,
        fn_constructor_kwargs={
            "model": model,
            "categories": manifest["categories"],
            "score_threshold": score_threshold,
            "threads": plan.threads,
            "amp": amp,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        udf_modifying_row_count=False,
    )
    rows = []
    split = str(shards_dir).rstrip("/").rsplit("/", 1)[-1]
    with ImageProgress(f"evaluate {split}", total=manifest["counts"]["images"]) as meter:
        for row in predicted.iter_rows():
            rows.append(row)
            meter.add(1)
    images: list[tuple[int, str]] = []
    results: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: int(r["image_id"])):
        images.append((int(row["image_id"]), str(row["file_name"])))
        results.extend(json.loads(row["results"]))
    return images, results


def _pool_plan(concurrency: int | str, resources: Mapping[str, float]) -> PoolPlan:
    """The actor pool for ``concurrency`` (an int, or "auto") on a cluster with ``resources``.

    With GPUs: one actor per GPU ("auto", and the most allowed). On CPUs the actors share all
    but one of the cluster's CPUs (Ray Data's read tasks need one: actors holding every CPU
    would wait for data forever), each computing with its share of the cores; "auto" is one
    actor per ``CPUS_PER_AUTO_ACTOR`` CPUs.
    """
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    limit = gpus if gpus else cpus
    wanted = (gpus or max(1, cpus // CPUS_PER_AUTO_ACTOR)) if concurrency == "auto" else concurrency
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ValueError(
            f'evaluate.concurrency must be a positive integer or "auto", got {concurrency!r}'
        )
    size = min(wanted, limit)
    if size < wanted:
        log.warning(
            "evaluate.concurrency %d lowered to %d to fit the cluster (%s)",
            wanted,
            size,
            "one actor per GPU" if gpus else "one per CPU",
        )
    if gpus:
        return PoolPlan(size=size, num_cpus=1, num_gpus=1, threads=max(1, cpus // size))
    share = min(1.0, max(cpus - 1, 1) / size)
    return PoolPlan(size=size, num_cpus=share, num_gpus=0, threads=max(1, cpus // size))


def _check_source(
    manifest: Mapping[str, Any], annotation_file: storage.Location, actual: str
) -> None:
    """Warn when the shards were made from another annotation file than the one scored against
    (``actual``: the sha256 of the one scored against)."""
    expected = manifest.get("annotation_sha256")
    if expected and expected != actual:
        log.warning(
            "%s differs from the annotation file the shards were made from "
            "(sha256 %s...): scores may not mean what you think",
            annotation_file,
            expected[:12],
        )


def _write_csv(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_overlays(
    images: Sequence[tuple[int, str]],
    results: Sequence[Mapping[str, Any]],
    *,
    images_dir: storage.Location,
    out_dir: Path,
    categories: Sequence[Mapping[str, Any]],
    threshold: float,
) -> list[Path]:
    """The original image with its detections above ``threshold`` drawn, one PNG per image."""
    label_of = {int(c["id"]): int(c["label"]) for c in categories}
    names = {int(c["label"]): str(c["name"]) for c in categories}
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        if r["score"] >= threshold:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    written = []
    for image_id, file_name in images:
        try:
            pixels = read_image(images_dir, file_name)
        except ValueError as err:
            where = storage.join(images_dir, file_name)
            log.warning("no overlay for image %s (%s): %s", image_id, where, err)
            continue
        kept = by_image.get(image_id, [])
        height, width = pixels.shape[:2]
        masks = (
            np.stack([decode_rle(r["segmentation"]["counts"], height, width) for r in kept])
            if kept
            else np.zeros((0, height, width), np.uint8)
        )
        boxes = np.array(
            [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in kept)], dtype=np.float32
        ).reshape(-1, 4)
        picture = draw_detections(
            pixels,
            boxes=boxes,
            labels=np.array([label_of[r["category_id"]] for r in kept]),
            scores=np.array([r["score"] for r in kept]),
            masks=masks,
            names=names,
        )
        stem = re.sub(r"[^\w.-]", "_", Path(file_name).stem)
        written.append(save_overlay(picture, out_dir / f"{image_id}_{stem}.png"))
    return written


def log_to_run(run: Mapping[str, str], metrics: Mapping[str, Any], out_dir: Path) -> None:
    """Metrics as ``eval/<name>`` (per class: ``eval/<type>_AP/<class>``), files under ``eval/``."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run["tracking_uri"])
    now = int(time.time() * 1000)
    values = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for iou_type, per_class in metrics.get("per_class", {}).items():
        for name, value in per_class.items():
            if value is not None:
                values[f"eval/{iou_type}_AP/{_metric_name(name)}"] = value
    batch = [Metric(key, float(value), now, 0) for key, value in values.items()]
    client.log_batch(run["run_id"], metrics=batch)
    client.log_artifacts(run["run_id"], str(out_dir), artifact_path="eval")
    log.info(
        "logged %d eval metrics and the eval files to MLflow run %s", len(values), run["run_id"]
    )


def _metric_name(name: str) -> str:
    """MLflow allows letters, digits, and _ - . / and space in metric names."""
    return re.sub(r"[^\w\-. /]", "_", name)
