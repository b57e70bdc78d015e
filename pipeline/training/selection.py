"""Which checkpoint becomes the train stage's model (``train.select``), and how Ray keeps them.

With evaluations on, every checkpoint reports its segm AP (``periodic_eval.SCORE``; a checkpoint
taken between evaluations reports ``NOT_EVALUATED``) and Ray Train's own ``CheckpointConfig``
keeps the ``keep_checkpoints`` best of them besides the latest (which a resume needs): nothing
here deletes or ranks files by hand. ``select: best`` takes the highest-scoring checkpoint Ray
kept (``Result.best_checkpoints``), ``last`` the latest (``Result.checkpoint``). The weights
written are the checkpoint's EMA when it has one, else its raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train import CheckpointConfig

from pipeline.config.settings import TrainSettings
from pipeline.io import storage
from pipeline.training.ema import EMA_FILE
from pipeline.training.periodic_eval import NOT_EVALUATED, SCORE
from pipeline.training.state import MODEL_FILE


@dataclass(frozen=True, kw_only=True)
class Selected:
    """The weights to write and where they came from (the train stage's metrics JSON)."""

    state: dict[str, torch.Tensor]
    selected: str  # best or last
    step: int
    best_score: float | None  # the best segm AP Ray kept; None without evaluations
    ema: bool

    def metrics(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "selected_step": self.step,
            "best_segm_AP": self.best_score,
            "selected_ema": self.ema,
        }


def checkpoint_config(settings: TrainSettings) -> CheckpointConfig:
    """Keep ``keep_checkpoints`` checkpoints: the best by eval segm AP when evaluations are on
    (Ray always keeps the latest too), else the latest ones."""
    if settings.eval_every <= 0:
        return CheckpointConfig(num_to_keep=settings.keep_checkpoints)
    return CheckpointConfig(
        num_to_keep=settings.keep_checkpoints,
        checkpoint_score_attribute=SCORE,
        checkpoint_score_order="max",
    )


def select_checkpoint(result: ray.train.Result, settings: TrainSettings, *, where: str) -> Selected:
    """The checkpoint ``settings.select`` asks for, read; ``best`` without any evaluated
    checkpoint (the run stopped before its first evaluation) falls back to the latest."""
    if result.checkpoint is None:
        raise RuntimeError(f"training in {where} left no checkpoint")
    scored = [
        (float(metrics.get(SCORE, NOT_EVALUATED)), int(metrics.get("step", 0)), checkpoint)
        for checkpoint, metrics in result.best_checkpoints or []
    ]
    scored = [s for s in scored if s[0] > NOT_EVALUATED]
    # Ties go to the later checkpoint, as Ray Train ranks them (it deletes the earlier one).
    best = max(scored, key=lambda s: (s[0], s[1])) if scored else None
    if settings.select == "best" and best is not None:
        chosen, selected, step = best[2], "best", best[1]
    else:
        chosen, selected = result.checkpoint, "last"
        step = int((result.metrics or {}).get("step", 0))
    state, ema = _read_weights(chosen)
    return Selected(
        state=state,
        selected=selected,
        step=step,
        best_score=best[0] if best else None,
        ema=ema,
    )


def _read_weights(checkpoint: ray.train.Checkpoint) -> tuple[dict[str, torch.Tensor], bool]:
    with checkpoint.as_directory() as directory:
        ema = (Path(directory) / EMA_FILE).is_file()
        path = Path(directory) / (EMA_FILE if ema else MODEL_FILE)
        return torch.load(path, map_location="cpu", weights_only=True), ema


def eval_spec(
    *, settings: TrainSettings, train_dir: str, val_annotations: storage.Location | None
) -> dict[str, Any] | None:
    """What rank 0's evaluator needs (``periodic_eval.rank0_evaluator``): the val split beside
    the train split, and the annotation file's bytes in the object store (rank 0 may run on a
    node that cannot read the driver's files)."""
    if settings.eval_every <= 0:
        return None
    if val_annotations is None:
        raise ValueError(
            "train.eval_every needs the val annotation file (data.val_annotations) to score with"
        )
    val_dir = storage.join(train_dir.rstrip("/").rsplit("/", 1)[0], "val")
    return {"val_dir": val_dir, "annotations": ray.put(storage.read_bytes(val_annotations))}
