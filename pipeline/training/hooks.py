"""What the training loop does besides stepping: the EMA of the weights and the evaluations.

One object per worker, called at four points of the loop (start, after each optimizer step,
each checkpoint, the summary), so that the loop itself stays about stepping and checkpointing.
Rank 0 holds the EMA (``pipeline.training.ema``) and the evaluator
(``pipeline.training.periodic_eval``); every rank knows when an evaluation is due (the step
count is the same everywhere) and learns from rank 0 whether patience ran out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config.settings import TrainSettings
from pipeline.training.ema import EMA_FILE, WeightsEMA
from pipeline.training.periodic_eval import (
    NOT_EVALUATED,
    SCORE,
    PeriodicEval,
    out_of_patience,
    record_score,
)
from pipeline.training.state import Progress

log = logging.getLogger(__name__)


class RecipeHooks:
    """EMA and evaluation during training for one worker (both off by default)."""

    def __init__(
        self,
        settings: TrainSettings,
        *,
        rank: int,
        world: int,
        evaluator: PeriodicEval | None = None,
    ) -> None:
        self.settings, self.rank, self.world = settings, rank, world
        self.evaluator = evaluator if rank == 0 else None
        self.ema: WeightsEMA | None = None
        self.last_score: tuple[int, float] | None = None  # (step, segm AP) of the latest eval

    def start(self, module: nn.Module, *, checkpoint_dir: str | Path | None = None) -> None:
        """After the weights are in place: the EMA starts from them, or from the checkpoint's
        EMA when resuming (a checkpoint written without EMA restarts it from its weights)."""
        if self.settings.ema_decay <= 0 or self.rank != 0:
            return
        self.ema = WeightsEMA(module, decay=self.settings.ema_decay)
        path = Path(checkpoint_dir) / EMA_FILE if checkpoint_dir else None
        if path is not None and path.is_file():
            self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif path is not None:
            log.warning("checkpoint %s has no %s: the EMA restarts here", checkpoint_dir, EMA_FILE)

    def after_step(self, module: nn.Module, progress: Progress) -> None:
        """Update the EMA of the weights, when there is one."""
        if self.ema is not None:
            self.ema.update(module, step=progress.step)

    def evaluate_if_due(self, module: nn.Module, progress: Progress, log_fn: Any) -> bool:
        """Evaluate when due (rank 0; logged at its step); return whether an evaluation was due
        at this step (on every rank)."""
        step, s = progress.step, self.settings
        due = s.eval_every > 0 and (step % s.eval_every == 0 or step == s.steps)
        if not due or self.evaluator is None:
            return due
        weights = self.ema.shadow if self.ema is not None else module.state_dict()
        result = self.evaluator(weights, step=step)
        record_score(progress, result.segm_ap)
        progress.evals.append({"step": step, **result.metrics()})
        self.last_score = (step, result.segm_ap)
        log.info(
            "step %d: eval on %d val images: bbox AP %.4f, segm AP %.4f (best %.4f at step %d), "
            "%.1f s",
            step,
            result.images,
            result.bbox_ap,
            result.segm_ap,
            progress.best_score,
            progress.best_step,
            result.seconds,
        )
        if log_fn:
            log_fn(result.metrics(), step)
        return due

    def stop(self, progress: Progress) -> bool:
        """Whether patience ran out, decided on rank 0 and known to every rank (a collective:
        every rank calls it after each evaluation)."""
        flag = [self.rank == 0 and out_of_patience(progress, self.settings.patience)]
        if self.world > 1:
            dist.broadcast_object_list(flag, src=0)
        if flag[0]:
            progress.stopped_early = True
            if self.rank == 0:
                log.info(
                    "stopping at step %d: %d evaluations without improvement (best segm AP "
                    "%.4f at step %d)",
                    progress.step,
                    progress.evals_since_best,
                    progress.best_score,
                    progress.best_step,
                )
        return bool(flag[0])

    def checkpoint_metrics(self, progress: Progress) -> dict[str, float]:
        """The score Ray Train ranks this checkpoint by: the evaluation at this step, else
        ``NOT_EVALUATED`` (evaluations off: nothing)."""
        if self.settings.eval_every <= 0:
            return {}
        last = self.last_score
        return {SCORE: last[1] if last and last[0] == progress.step else NOT_EVALUATED}

    def write(self, directory: str | Path) -> None:
        """This rank's part of the checkpoint: the EMA (rank 0, when on)."""
        if self.ema is not None:
            torch.save(self.ema.state_dict(), Path(directory) / EMA_FILE)

    @staticmethod
    def summary(progress: Progress) -> dict[str, Any]:
        return {
            "evals": progress.evals,
            "best_score": progress.best_score,
            "best_step": progress.best_step,
            "stopped_early": progress.stopped_early,
        }
