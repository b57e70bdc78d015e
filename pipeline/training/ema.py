"""An exponential moving average of the weights (``train.ema_decay``; 0 turns it off).

After optimizer step ``t`` (1-based) every floating-point tensor of the state dict moves as
``ema = d_t * ema + (1 - d_t) * weight`` with the warmed-up decay
``d_t = min(decay, (1 + t) / (10 + t))`` (the ramp of TensorFlow's ExponentialMovingAverage
with ``num_updates``, which timm's ModelEma uses too): early on, when the weights move fast and
the average would mostly remember the random initialisation, it follows the weights closely;
from about ``t = 9 / (1 - decay)`` on, the decay is the one set. detectron2 and mmdetection's
``1 - exp(-t / 2000)`` ramp takes thousands of steps to matter, longer than a short run.
Integer buffers (counters) are copied, not averaged.

The average lives on rank 0 only: DDP keeps every replica identical, so one rank's average is
every rank's; rank 0 is the one that evaluates and writes the checkpoint's weights, and the other
ranks keep no second copy of the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

EMA_FILE = "ema_state.pt"  # in the checkpoint directory, beside the raw weights


def ema_decay_at(step: int, decay: float) -> float:
    """The decay used by the update after optimizer step ``step`` (1-based)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightsEMA:
    """The average of ``model``'s state dict, on the model's device; starts at its weights."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int) -> None:
        """Fold the weights after optimizer step ``step`` into the average."""
        d = ema_decay_at(step, self.decay)
        for name, value in model.state_dict().items():
            average = self.shadow[name]
            if average.dtype.is_floating_point:
                average.mul_(d).add_(value.detach().to(average.dtype), alpha=1.0 - d)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights: a model state dict (what the written model holds)."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for name, average in self.shadow.items():
            average.copy_(state[name])
