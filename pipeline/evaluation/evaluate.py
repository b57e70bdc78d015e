"""Stage evaluate's logic: batch inference over the val shards, COCO scores, plots, overlays.

Inference (``pipeline.evaluation.inference``) turns batches of shard rows into COCO results in
original image coordinates, in this process on one machine, or on a Ray Data actor pool on a
cluster or several GPUs (``evaluate.concurrency``). The
driver scores the results with pycocotools against the original annotation file and writes
``metrics.json``, ``pr_curve.csv``, ``predictions.json`` and ``overlays/*.png``, then
logs all of it to the training's MLflow run (metrics prefixed ``eval/``, files under ``eval/``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from maskrcnn.checkpoints import read_model_info
from pipeline.coco.masks import decode_rle
from pipeline.coco.reader import read_image
from pipeline.evaluation.cocoeval import (
    flat_metrics,
    ground_truth_from_bytes,
    pr_curve_rows,
    score_all,
    summary_table,
)
from pipeline.evaluation.inference import (
    pool_plan,
    predict_here,
    predict_on_actors,
    runs_here,
)
from pipeline.inference.overlay import draw_detections, save_overlay
from pipeline.io import storage
from pipeline.io.ray_runtime import ensure_ray
from pipeline.shards.schema import read_manifest

log = logging.getLogger(__name__)


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
    processes: int | str = "auto",
    amp: str = "none",
    ray_address: str | None = None,
    verbose: bool = False,
    tracking_run: Mapping[str, str] | None = None,
    tracking_step: int = 0,
) -> dict[str, Any]:
    """Score the model on the split in ``shards_dir``; write the outputs; return the metrics.

    ``score_threshold`` drops detections before scoring (0 keeps everything the model returns,
    as COCO AP expects); overlays only draw those above ``overlay_score_threshold``.
    ``tracking_run`` is run.json's content (run_id, tracking_uri); None skips MLflow.
    ``tracking_step``: the training step of the model scored, where its figures go in the run's
    metric histories (next to those of the evaluations during training, not at step 0).
    ``concurrency`` is the number of inference actors, or "auto" (``_pool_plan``); ``processes``
    those of inference on this machine's CPUs (``local_processes``); ``amp`` the
    autocast dtype of inference on GPUs (the training's ``train.amp``); ``verbose``: Ray's own
    console lines, when a Ray runtime is started here for the actor pool.
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
    common = {
        "shards_dir": shards_dir,
        "manifest": manifest,
        "batch_size": batch_size,
        "score_threshold": score_threshold,
        "amp": amp,
    }
    if runs_here(concurrency, ray_address):
        images, results = predict_here(model_bytes=model_bytes, processes=processes, **common)
    else:
        ensure_ray(ray_address, verbose=verbose)
        plan = pool_plan(concurrency, ray.cluster_resources())
        images, results = predict_on_actors(model=ray.put(model_bytes), plan=plan, **common)
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
        log_to_run(tracking_run, metrics, out, step=tracking_step)
    return metrics


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


def log_to_run(
    run: Mapping[str, str], metrics: Mapping[str, Any], out_dir: Path, *, step: int = 0
) -> None:
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
    batch = [Metric(key, float(value), now, step) for key, value in values.items()]
    client.log_batch(run["run_id"], metrics=batch)
    client.log_artifacts(run["run_id"], str(out_dir), artifact_path="eval")
    log.info(
        "logged %d eval metrics and the eval files to MLflow run %s", len(values), run["run_id"]
    )


def _metric_name(name: str) -> str:
    """MLflow allows letters, digits, and _ - . / and space in metric names."""
    return re.sub(r"[^\w\-. /]", "_", name)
