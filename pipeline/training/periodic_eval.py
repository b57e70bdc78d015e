"""Evaluation during training (``train.eval_every``): COCO bbox and segm AP on the val shards.

Rank 0 scores a copy of the weights (the EMA when on) on the first ``eval_images`` val images
(by image id), with the evaluate stage's own scoring code (``pipeline.coco.cocoeval``, a layer
below training, which the evaluate stage imports too) and its detector
(``pipeline.inference.detector``): the curve during training and the evaluate stage's figure are
the same measure. The other ranks wait at their next collective meanwhile; spreading the images
over the ranks would save that wait on a multi-GPU run, at the price of gathering results, and
on one worker there is nothing to spread.

The score of each evaluation goes into the checkpoint's reported metrics (``SCORE``), where Ray
Train's ``CheckpointConfig(checkpoint_score_attribute=SCORE, checkpoint_score_order="max")``
ranks the checkpoints. The best score and the evaluations since it (``train.patience``) are
part of the checkpointed progress, so that a resumed run keeps its best-so-far.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray.train.torch
import torch

from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.coco.cocoeval import ground_truth_from_bytes, score_all
from pipeline.config.settings import TrainSettings
from pipeline.inference.detector import Detector
from pipeline.inference.shard_scoring import detect_rows, iter_rows
from pipeline.io.images import decode_rgb
from pipeline.shards.schema import read_manifest
from pipeline.training.state import Progress

SCORE = "eval_segm_AP"  # the reported metric Ray Train ranks checkpoints by
NOT_EVALUATED = -1.0  # the score of a checkpoint taken without an evaluation: below any AP
BATCH = 4  # val images per forward pass


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    step: int
    bbox_ap: float
    segm_ap: float
    seconds: float
    images: int

    def metrics(self) -> dict[str, float]:
        """The MLflow metric histories, at their step."""
        return {
            "eval/bbox_AP": self.bbox_ap,
            "eval/segm_AP": self.segm_ap,
            "eval/seconds": self.seconds,
        }


class PeriodicEval:
    """The val images (decoded once, in memory), their ground truth and a model to load
    weights into: ``__call__(state_dict, step)`` scores those weights."""

    def __init__(
        self,
        *,
        val_dir: str,
        annotations: bytes,
        model_config: ModelConfig,
        images: int | None,
        device: torch.device,
    ) -> None:
        manifest = read_manifest(val_dir)
        if manifest["canvas"] != model_config.canvas:
            raise ValueError(
                f"val shards in {val_dir} were made for canvas {manifest['canvas']}, the model's "
                f"is {model_config.canvas}: preprocess the val split with the model's canvas"
            )
        self.rows = _read_rows(val_dir, manifest, limit=images)
        self.images = [decode_rgb(row["image"]) for row in self.rows]
        self.gt = ground_truth_from_bytes(annotations)
        model = MaskRCNN(model_config)
        self.detector = Detector(model, categories=manifest["categories"], device=device)

    def __call__(self, state_dict: Mapping[str, torch.Tensor], *, step: int) -> EvalResult:
        started = time.perf_counter()
        self.detector.model.load_state_dict(state_dict)
        self.detector.model.eval()
        results: list[dict[str, Any]] = []
        for start in range(0, len(self.rows), BATCH):
            for image_results in detect_rows(
                self.detector,
                self.rows[start : start + BATCH],
                images=self.images[start : start + BATCH],
            ):
                results += image_results
        scores = score_all(self.gt, results, image_ids=[int(r["image_id"]) for r in self.rows])
        return EvalResult(
            step=step,
            bbox_ap=scores["bbox"].summary["AP"] or 0.0,
            segm_ap=scores["segm"].summary["AP"] or 0.0,
            seconds=time.perf_counter() - started,
            images=len(self.rows),
        )


def rank0_evaluator(
    spec: Mapping[str, Any] | None,
    settings: TrainSettings,
    model_config: ModelConfig,
    *,
    rank: int,
) -> PeriodicEval | None:
    """Rank 0's evaluator in a Ray Train worker when evaluations are on; ``spec``: the val
    split's location and the annotation file's bytes in the object store (the trainer's)."""
    if rank != 0 or settings.eval_every <= 0 or not spec:
        return None
    return PeriodicEval(
        val_dir=spec["val_dir"],
        annotations=ray.get(spec["annotations"]),
        model_config=model_config,
        images=settings.eval_images,
        device=ray.train.torch.get_device(),
    )


def _read_rows(val_dir: str, manifest: Mapping[str, Any], *, limit: int | None) -> list[dict]:
    """The first ``limit`` (all: None) val rows by image id."""
    rows = sorted(iter_rows(val_dir, manifest), key=lambda r: int(r["image_id"]))
    if not rows:
        raise ValueError(f"val shards in {val_dir} hold no images to evaluate on")
    return rows[:limit] if limit else rows


def record_score(progress: Progress, score: float) -> None:
    """Fold the evaluation at ``progress.step`` into the best-so-far and the patience count."""
    if score > progress.best_score:
        progress.best_score, progress.best_step = score, progress.step
        progress.evals_since_best = 0
    else:
        progress.evals_since_best += 1


def out_of_patience(progress: Progress, patience: int) -> bool:
    """Whether ``patience`` evaluations (> 0) in a row brought no improvement."""
    return patience > 0 and progress.evals_since_best >= patience
