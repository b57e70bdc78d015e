"""Loss and throughput bookkeeping, and the progress rank 0 shows every ``log_every`` steps:
one tqdm bar when the driver's stdout is a terminal (``BAR_ENV``, set by
``pipeline.io.ray_runtime.ensure_ray``; Ray's ``tqdm_ray`` draws a worker's bar in the driver),
else a plain line (CI, log files)."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray

from pipeline.io.ray_runtime import BAR_ENV

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
SHORT_NAMES = {
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
}


class LossWindow:
    """Loss sums since the last log, kept on the device (no sync per step), averaged over
    steps and ranks when reduced."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([losses[k].detach().double() for k in LOSS_NAMES])
        self.sums += torch.cat([values.sum().reshape(1), values])
        self.count += 1

    def finite(self, world: int) -> bool:
        """Whether every loss since the last reduce was finite, on every rank (one sync)."""
        flag = torch.isfinite(self.sums).all().to(torch.float64).reshape(1)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def reduce(self, world: int) -> dict[str, float]:
        """Mean of each loss (and their sum, ``loss``) over the window, on every rank."""
        totals = torch.cat([self.sums, torch.tensor([self.count], device=self.device)])
        if world > 1:
            dist.all_reduce(totals)
        *sums, count = totals.tolist()
        self.sums.zero_()
        self.count = 0
        return {k: v / count for k, v in zip(("loss", *LOSS_NAMES), sums, strict=True)}


@dataclass
class ThroughputMeter:
    """Images, time waiting for data and time overall, per window and since the start.

    "Waiting for data" is the time the loop spends blocked on the next batch: the share of
    the data pipeline that prefetching did not hide behind compute.
    """

    start: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    images: int = 0
    wait_s: float = 0.0
    total_images: int = 0
    total_wait_s: float = 0.0

    def add(self, *, images: int, wait_s: float) -> None:
        self.images += images
        self.wait_s += wait_s
        self.total_images += images
        self.total_wait_s += wait_s

    def window(self) -> tuple[float, float]:
        """(images/s, data-wait fraction) since the last call; starts a new window."""
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        rate, wait = self.images / elapsed, min(self.wait_s / elapsed, 1.0)
        self.window_start, self.images, self.wait_s = now, 0, 0.0
        return rate, wait

    def overall(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "images_per_s": self.total_images / elapsed,
            "data_wait_fraction": min(self.total_wait_s / elapsed, 1.0),
            "train_s": elapsed,
        }


def show_progress(
    *,
    step: int,
    steps: int,
    losses: dict[str, float],
    lr: float,
    images_per_s: float,
    data_wait: float,
    eta_s: float,
) -> None:
    """Move the bar to ``step`` (loss, img/s and ETA in its text), or log ``progress_line``."""
    line = progress_line(
        step=step,
        steps=steps,
        losses=losses,
        lr=lr,
        images_per_s=images_per_s,
        data_wait=data_wait,
        eta_s=eta_s,
    )
    if os.environ.get(BAR_ENV) != "1":
        log.info("%s", line)
        return
    _bar(steps).show(step, line.split(" | ", 1)[1])  # the bar counts the steps itself


class _Bar:
    """A tqdm_ray bar moved to a step (rather than by increments)."""

    def __init__(self, steps: int) -> None:
        self.bar, self.step, self.steps = tqdm_ray.tqdm(total=steps, unit="step"), 0, steps

    def show(self, step: int, text: str) -> None:
        self.bar.set_description(text)
        self.bar.update(step - self.step)
        self.step = step
        if step >= self.steps:
            self.bar.close()


@functools.cache
def _bar(steps: int) -> _Bar:
    """One bar per worker process (a restarted worker group starts a new one)."""
    return _Bar(steps)


def progress_line(
    *,
    step: int,
    steps: int,
    losses: dict[str, float],
    lr: float,
    images_per_s: float,
    data_wait: float,
    eta_s: float,
) -> str:
    """``step 40/100 | loss 1.234 (obj 0.10 rpn_box 0.05 ...) | lr 2.0e-03 | 8.1 img/s |
    data wait 3% | ETA 0:01:14``"""
    parts = " ".join(f"{SHORT_NAMES.get(k, k)} {losses[k]:.3f}" for k in LOSS_NAMES if k in losses)
    return (
        f"step {step}/{steps} | loss {losses.get('loss', float('nan')):.3f} ({parts}) | "
        f"lr {lr:.2e} | {images_per_s:.1f} img/s | data wait {data_wait:.0%} | "
        f"ETA {format_duration(eta_s)}"
    )


def format_duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
