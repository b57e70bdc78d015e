"""Loss and throughput bookkeeping, and the progress line rank 0 logs every ``log_every`` steps.

On a terminal the driver draws a tqdm bar instead (``progress_bar``: rank 0 feeds it through a
small actor), and the line goes to Ray Train's worker log file only; otherwise it is the
console's progress line. A non-finite loss ends the training (``diverged_message``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.io.console import format_duration

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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation during training) counts in neither the window nor
        the whole run: both clocks start that much later."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.start += seconds
            self.window_start += seconds

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


def diverged_message(losses: dict[str, float], *, step: int) -> str:
    """Why training stops on a non-finite loss (as detectron2 does): every later step would
    be NaN too, and a run that goes on logging NaN for an hour helps nobody. ``losses`` are
    the means since the last log; the first non-finite one is at ``step`` or before."""
    values = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
    return (
        f"training diverged at step {step}: the loss is not finite (means since the last "
        f"log: {values}). Lower train.base_lr, lengthen train.warmup_steps or set "
        "train.grad_clip, and run again."
    )
