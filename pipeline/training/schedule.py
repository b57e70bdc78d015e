"""The optimizer and its learning-rate schedule: linear warmup, then step or cosine decay.

The factor is a pure function of the optimizer step, so a resumed run lands on exactly the
learning rate it would have had, whatever the scheduler state holds. A schedule given in epochs
(``train.epochs``, ``milestones_epochs``, ``warmup_epochs``) becomes steps once, on the driver
(:func:`in_steps`): the workers, the ETA and the checkpoints only ever see steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from pipeline.config.settings import TrainSettings


def lr_factor(
    step: int,
    *,
    schedule: str,
    steps: int,
    warmup_steps: int,
    warmup_factor: float,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warmup ramps linearly from ``warmup_factor`` at step 0 to 1 at ``warmup_steps``; it
    multiplies the main schedule (multistep: ``gamma`` per milestone passed; cosine: from 1 at
    step 0 to 0 at ``steps``), as in detectron2's ``WarmupParamScheduler``.
    """
    if schedule == "multistep":
        main = gamma ** sum(1 for m in milestones if step >= m)
    elif schedule == "cosine":
        main = 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r} (multistep or cosine)")
    if step < warmup_steps:
        alpha = step / warmup_steps
        main *= warmup_factor * (1.0 - alpha) + alpha
    return main


def make_optimizer(
    params: list[torch.nn.Parameter], settings: TrainSettings
) -> torch.optim.Optimizer:
    """SGD with momentum (the Mask R-CNN recipe) or AdamW (decoupled weight decay), at the
    peak learning rate; the scheduler scales it."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` (whose lr is the peak lr) following ``settings``."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            schedule=settings.schedule,
            steps=settings.steps,
            warmup_steps=settings.warmup_steps,
            warmup_factor=settings.warmup_factor,
            milestones=settings.milestones,
            gamma=settings.gamma,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(train_images: int, global_batch: int) -> int:
    """Optimizer steps in one pass over the train split: ceil(images / global batch)."""
    if train_images < 1:
        raise ValueError(f"the train split has {train_images} images: nothing to train on")
    return math.ceil(train_images / global_batch)


def in_steps(settings: TrainSettings, train_manifest: Mapping[str, Any]) -> TrainSettings:
    """``settings`` with its length, milestones and warmup in steps (``epochs``,
    ``milestones_epochs`` and ``warmup_epochs`` cleared), one epoch being
    :func:`steps_per_epoch` of the train manifest's image count; settings already in steps
    come back unchanged."""
    if (
        settings.epochs is None
        and not settings.milestones_epochs
        and settings.warmup_epochs is None
    ):
        return settings
    per_epoch = steps_per_epoch(int(train_manifest["counts"]["images"]), settings.global_batch)
    steps = settings.steps if settings.epochs is None else settings.epochs * per_epoch
    milestones = settings.milestones or tuple(
        round(m * per_epoch) for m in settings.milestones_epochs
    )
    warmup = settings.warmup_steps
    if settings.warmup_epochs is not None:
        warmup = round(settings.warmup_epochs * per_epoch)
    return replace(
        settings,
        steps=steps,
        epochs=None,
        milestones=tuple(sorted(set(milestones))),
        milestones_epochs=(),
        warmup_steps=warmup,
        warmup_epochs=None,
    )
